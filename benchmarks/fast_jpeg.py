"""`curator embed --fast-jpeg` (JPEG decoded at reduced scale in the DCT domain) vs the exact path.

Writes a synthetic archive of full-size radiograph JPEGs (`curator synth --format png` at
--size pixels, every image re-encoded as JPEG quality 95, as MIMIC-CXR-JPG ships them), then
prints, medians of --repeats runs in this one process:
  decode + preprocess only, exact vs fast (one process, one thread),
  `curator embed` end to end, exact vs fast (--workers decode workers),
  and how far the fast path moves the probabilities of the given checkpoint (default: the bundled
  demo model) from the exact path: max and mean |p_fast - p_exact| over every image and finding.

    python benchmarks/fast_jpeg.py --studies 48 --size 2500 --repeats 3
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ray_overhead import probabilities  # noqa: E402  (sibling benchmark script; imports no Ray at module level)


def jpeg_archive(folder: Path, studies: int, size: int) -> list[Path]:
    from PIL import Image

    src = folder.parent / "src"
    subprocess.run([sys.executable, "-m", "curator.cli", "-q", "synth", str(src), "--studies", str(studies), "--seed", "21",
                    "--format", "png", "--image-size", str(size), "--no-broken", "--workers", "2"], check=True)
    folder.mkdir()
    out = []
    for i, p in enumerate(sorted(q for q in src.rglob("*") if q.suffix in (".png", ".jpg"))):
        dst = folder / f"img{i:04d}.jpg"
        with Image.open(p) as im:
            im.convert("L").save(dst, quality=95)
        out.append(dst)
    return out


def decode_rate(paths: list[Path], options) -> float:
    from curator.discover import FileEntry
    from curator.pipelines.stages import read_item

    t0 = time.perf_counter()
    for p in paths:
        st = p.stat()
        it = read_item(FileEntry(str(p), st.st_size, st.st_mtime_ns), options)
        assert it["ok"], it
    return len(paths) / (time.perf_counter() - t0)


def embed(archive: Path, ws: Path, ck: str, options, workers: int, threads: int) -> float:
    from curator.pipelines.embed import EmbedConfig, run_embed

    s = run_embed(EmbedConfig(archives=[str(archive)], workspace=str(ws), checkpoints=[ck], device="cpu", progress=False,
                              workers=workers, threads=threads, read_options=options))
    return s.processed / s.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=48)
    ap.add_argument("--size", type=int, default=2500, help="longer side of the films (default 2500)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default="demo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from curator.cli import resolve_checkpoint_arg
    from curator.readers import ReadOptions

    ck = resolve_checkpoint_arg(args.checkpoint)
    exact, fast = ReadOptions(), ReadOptions(jpeg_draft_min_side=320)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = jpeg_archive(tmp / "jpeg", args.studies, args.size)
        dec = {"exact": [], "fast": []}
        emb = {"exact": [], "fast": []}
        for r in range(args.repeats):
            for name, opt in (("exact", exact), ("fast", fast)):
                dec[name].append(decode_rate(paths, opt))
                emb[name].append(embed(tmp / "jpeg", tmp / f"ws-{name}-{r}", ck, opt, args.workers, args.threads))
        pe, pf = probabilities(tmp / "ws-exact-0"), probabilities(tmp / "ws-fast-0")
        assert pe.keys() == pf.keys()
        dev = np.abs(np.stack([pf[k] - pe[k] for k in pe]))
    med = {k: statistics.median(v) for k, v in dec.items()}
    mee = {k: statistics.median(v) for k, v in emb.items()}
    print(f"{len(paths)} JPEG films, longer side {args.size} px, quality 95; {args.workers} workers, {args.threads} thread(s); medians of {args.repeats}")
    print(f"  decode+preprocess, exact   {med['exact']:7.2f} images/s")
    print(f"  decode+preprocess, fast    {med['fast']:7.2f} images/s   ({med['fast'] / med['exact']:.2f}x)")
    print(f"  curator embed, exact       {mee['exact']:7.2f} images/s")
    print(f"  curator embed, --fast-jpeg {mee['fast']:7.2f} images/s   ({mee['fast'] / mee['exact']:.2f}x)")
    print(f"  |p_fast - p_exact| over {dev.shape[0]} images x {dev.shape[1]} findings: max {dev.max():.4f}, mean {dev.mean():.5f}, "
          f"99th percentile {np.percentile(dev, 99):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
