"""Crash-safety trials: SIGKILL `curator embed` at random moments, rerun, count lost and duplicated rows.

Each trial kills an embed run either from inside at a seeded random point (after a batch is read,
after the model, after a part is written, with the new manifest on disk but not renamed, just
after a commit) or from outside after a random delay, sometimes twice, then reruns it to the end
and compares the workspace with the archive: every valid image must have exactly one catalog row,
one embedding and one ensemble prediction row; `curator verify` must pass.

    python benchmarks/faults.py --trials 20 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POINTS = ["batch", "mapped", "part", "manifest-tmp", "commit"]


def make_archive(folder: Path, n: int, seed: int) -> int:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (int(rng.integers(100, 400)), int(rng.integers(100, 400))), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return n


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from curator.model import new_clip

    torch.manual_seed(0)
    torch.save(new_clip(32, 64, 2, 32, 224, 64, 2).state_dict(), path)
    return path


def cmd(arc, ws, ck, workers):
    return [sys.executable, "-m", "curator.cli", "-q", "embed", str(arc), "--workspace", str(ws), "--checkpoint", str(ck),
            "--device", "cpu", "--batch-size", "2", "--flush-rows", "3", "--workers", str(workers)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from curator.query import run_query
    from curator.verify import verify
    from curator.workspace import Workspace

    rng = random.Random(args.seed)
    injected = lost = duplicated = verify_failures = 0
    by_point: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_valid = make_archive(tmp / "arc", args.images, args.seed)
        ck = tiny_checkpoint(tmp / "tiny.pt")
        for t in range(args.trials):
            ws = tmp / f"ws{t}"
            kills = 1 + (rng.random() < 0.3)
            for _ in range(kills):
                workers = rng.choice([0, 2])
                if rng.random() < 0.3:
                    proc = subprocess.Popen(cmd(tmp / "arc", ws, ck, workers), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(rng.uniform(1.0, 6.0))
                    proc.send_signal(signal.SIGKILL)
                    rc = proc.wait()
                    point = "external"
                else:
                    point = rng.choice(POINTS)
                    env = dict(os.environ, CURATOR_CRASH_AT=f"{point}:{rng.randint(1, 4)}")
                    rc = subprocess.run(cmd(tmp / "arc", ws, ck, workers), env=env, capture_output=True).returncode
                if rc == -signal.SIGKILL:
                    injected += 1
                    by_point[point] = by_point.get(point, 0) + 1
            r = subprocess.run(cmd(tmp / "arc", ws, ck, 0), capture_output=True, text=True)
            if r.returncode != 0:
                print(f"trial {t}: rerun failed: {r.stderr.strip()[-300:]}")
                verify_failures += 1
                continue
            rep = verify(str(ws))
            verify_failures += not rep.ok
            df = run_query(Workspace(ws), "SELECT (SELECT count(DISTINCT path) FROM catalog_raw) d, (SELECT count(*) FROM catalog_raw) c, "
                                          "(SELECT count(*) FROM embeddings_raw) e, (SELECT count(*) FROM predictions WHERE member = 'ensemble') p")
            d, c, e, p = df.iloc[0].tolist()
            lost += max(0, n_valid - d)
            duplicated += (c - d) + max(0, e - d) + max(0, p - d)
    print(f"trials run:        {args.trials}")
    print(f"failures injected: {injected}  ({', '.join(f'{k} {v}' for k, v in sorted(by_point.items()))})")
    print(f"rows lost:         {lost}  (must be 0)")
    print(f"rows duplicated:   {duplicated}  (must be 0)")
    print(f"verify failures:   {verify_failures}  (must be 0)")
    return 0 if lost == duplicated == verify_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
