"""Ray engine vs local engine on this machine: same outputs, and what Ray costs.

Generates a synthetic PNG archive (`curator synth --format png`), then embeds it alternately with
the local engine and the Ray engine (a local Ray cluster started once, as on a real cluster where it
is already running), each run into a fresh workspace, once over half the files and once over all of
them. From the two wall times it prints, per engine, the fixed cost of a run (start-up: worker
processes, model load, text encoding) and the marginal rate (images/s once running), medians over
the repeats; their ratios; and the largest probability difference between the two workspaces.

    python benchmarks/ray_overhead.py --studies 48 --repeats 3 --cpus 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def probabilities(ws_root: Path) -> dict:
    """path -> the `images` view's probabilities (every finding column the workspace shows)."""
    from curator.query import run_query
    from curator.workspace import Workspace

    ws = Workspace(ws_root)
    cols = sorted(ws.manifest["finding_columns"])
    df = run_query(ws, f"SELECT path, {', '.join(cols)} FROM images ORDER BY path")
    return {p: df.loc[i, cols].to_numpy(np.float64) for i, p in enumerate(df["path"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster and decode workers of the local engine")
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model (both engines)")
    args = ap.parse_args()

    import ray
    import torch

    from curator.cli import resolve_checkpoint_arg
    from curator.pipelines.embed import EmbedConfig, run_embed

    torch.set_num_threads(args.threads)
    ck = resolve_checkpoint_arg(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arc = tmp / "arc"
        subprocess.run([sys.executable, "-m", "curator.cli", "-q", "synth", str(arc), "--studies", str(args.studies),
                        "--seed", "11", "--format", "png", "--no-broken"], check=True)
        t0 = time.perf_counter()
        os.environ.setdefault("RAY_worker_niceness", "0")  # as curator's own local cluster (Ray's default is 15)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        times: dict[tuple[str, str], list[float]] = {}
        counts = {}
        last = {}
        for r in range(args.repeats):
            for size in ("half", "full"):
                for engine in ("local", "ray"):
                    ws = tmp / f"ws-{engine}-{size}-{r}"
                    cfg = EmbedConfig(archives=[str(arc)], workspace=str(ws), checkpoints=[ck], device="cpu", progress=False,
                                      threads=args.threads, workers=args.cpus, engine=engine)
                    if size == "half":
                        cfg.limit = max(1, counts.get("full", 2 * args.studies) // 2)
                    s = run_embed(cfg)
                    counts[size] = s.processed
                    times.setdefault((engine, size), []).append(s.seconds)
                    last[engine] = ws
        ray.shutdown()
        pl, pr = probabilities(last["local"]), probabilities(last["ray"])
        assert pl.keys() == pr.keys(), "the engines catalogued different files"
        worst = max(float(np.abs(pl[k] - pr[k]).max()) for k in pl)
    nh, nf = counts["half"], counts["full"]
    out = {}
    for engine in ("local", "ray"):
        th, tf = statistics.median(times[(engine, "half")]), statistics.median(times[(engine, "full")])
        marginal = (nf - nh) / max(tf - th, 1e-9)
        fixed = max(0.0, th - nh / marginal)
        out[engine] = (tf, nf / tf, marginal, fixed)
        print(f"{engine:5s} engine: {nf} images in {tf:.1f} s ({nf / tf:.1f} images/s end to end); "
              f"marginal {marginal:.1f} images/s, fixed cost per run {fixed:.1f} s "
              f"(medians of {args.repeats}; half run {nh} images in {th:.1f} s)")
    print(f"ratio local/ray, end to end ({nf} images): {out['local'][1] / out['ray'][1]:.2f}")
    print(f"ratio local/ray, marginal rate:      {out['local'][2] / out['ray'][2]:.2f}")
    print(f"ray.init (once per session):         {startup:.1f} s")
    print(f"max |p_local - p_ray| over all images and findings: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
