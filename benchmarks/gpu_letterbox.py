"""`curator embed --gpu-letterbox` (the letterbox and transform beside the model) vs the default path.

On a GPU node the reader workers are the limit, and a full-size film's Lanczos letterbox costs
them about as much as decoding it. With the option they only decode and convert; the letterbox
runs on the model's device with Pillow's arithmetic to the bit (curator.device_jpeg). For
synthetic 2000x2500 films of each --format (--films distinct ones, hard-linked up to --images
files), in one process, medians of --repeats:
  reader stage       images/s out of --workers processes, default vs with the option (the
                     workers' share of the work; this is what a GPU node's cores limit);
  device letterbox   images/s of device_jpeg.model_inputs on decoded films on --device
                     (stacked on a GPU; film by film on a CPU);
  curator embed      end to end, default vs --gpu-letterbox, ViT-B/32-sized random checkpoint,
                     with each run's stage times from its run record;
  max |p_option - p_default| on the films with --checkpoint (default: the demo model): the
                     canvases are the same, so 0 on a CPU; on a GPU the model's fp16 batches move it.

    python benchmarks/gpu_letterbox.py --device cuda --images 1024 --films 32 --workers 16 --batch-size 256
    python benchmarks/gpu_letterbox.py --device cpu --images 64 --films 64 --workers 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from embed_throughput import machine, make_archive, timed_embed, vit_b32_checkpoint  # noqa: E402  (sibling benchmark scripts)
from gpu_jpeg import links  # noqa: E402
from ray_overhead import probabilities  # noqa: E402


def reader_rate(folder: Path, workers: int, batch: int, on_device: bool) -> float:
    """Files per second out of the reader workers, fed as `curator embed` feeds them."""
    from curator.discover import walk
    from curator.pipelines.embed import EmbedConfig, batches
    from curator.readers import ReadOptions

    t0 = time.perf_counter()
    entries = list(walk([folder]))
    cfg = EmbedConfig(archives=[], workspace="", checkpoints=[], workers=workers, batch_size=batch,
                      read_options=ReadOptions(letterbox_on_device=on_device))
    n = 0
    for b in batches(entries, cfg):
        n += len(b["rows"])
        assert len(b["images"]) == (len(b["rows"]) if on_device else 0)
    assert n == len(entries)
    return n / (time.perf_counter() - t0)


def device_letterbox_rate(folder: Path, device: torch.device, batch: int) -> float:
    """Films per second through device_jpeg.model_inputs on ``device`` (decoded films already there)."""
    from curator import device_jpeg
    from curator.readers import ReadOptions, read_image

    paths = sorted(folder.iterdir())[:batch]
    images = [torch.from_numpy(np.array(read_image(p, ReadOptions()).image)).to(device) for p in paths]
    device_jpeg.model_inputs(images)  # warm-up (resize matrices)
    rates = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        device_jpeg.model_inputs(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates)


def embed(archive: Path, ws: Path, ck: str, device: str, workers: int, batch: int, threads: int, on_device: bool,
          breakdown: list | None = None) -> float:
    from curator.readers import ReadOptions

    s = timed_embed(archive, ws, ck, device, workers, batch, threads, ReadOptions(letterbox_on_device=on_device), breakdown)
    return s.processed / s.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--format", action="append", choices=["jpeg", "dicom"], help="repeatable (default: jpeg and dicom)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: number of cores)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--films", type=int, default=32, help="distinct films written per format; the archive hard-links them up to --images")
    ap.add_argument("--distinct", type=int, default=8, help="films for the probability deviation")
    ap.add_argument("--checkpoint", default="demo", help="for the probability deviation (default: the bundled demo model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)

    from curator.cli import resolve_checkpoint_arg

    res: dict = {**machine(device), "workers": args.workers, "threads": threads, "batch_size": args.batch_size, "images": args.images,
                 "size": [args.width, args.height], "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = str(vit_b32_checkpoint(tmp / "vitb32.pt"))
        demo = resolve_checkpoint_arg(args.checkpoint)
        for fmt in args.format or ["jpeg", "dicom"]:
            folder = tmp / fmt
            src = make_archive(tmp / f"{fmt}-src", min(args.films, args.images), fmt, args.width, args.height)
            links(src, folder, args.images)
            few = tmp / f"{fmt}-few"
            make_archive(few, args.distinct, fmt, args.width, args.height, seed=1)
            r: dict = {}
            embed(few, tmp / f"{fmt}-p-default", demo, args.device, args.workers, args.batch_size, threads, False)
            embed(few, tmp / f"{fmt}-p-option", demo, args.device, args.workers, args.batch_size, threads, True)
            pe, po = probabilities(tmp / f"{fmt}-p-default"), probabilities(tmp / f"{fmt}-p-option")
            assert pe.keys() == po.keys()
            r["prob_max_abs_diff"] = float(np.abs(np.stack([po[k] - pe[k] for k in pe])).max())
            r["device_letterbox"] = device_letterbox_rate(folder, device, args.batch_size)
            runs: dict[str, list] = {"reader_default": [], "reader_option": [], "embed_default": [], "embed_option": []}
            r["breakdown_default"], r["breakdown_option"] = [], []
            for i in range(args.repeats):
                runs["reader_default"].append(reader_rate(folder, args.workers, args.batch_size, False))
                runs["reader_option"].append(reader_rate(folder, args.workers, args.batch_size, True))
                runs["embed_default"].append(embed(folder, tmp / f"{fmt}-d{i}", ck, args.device, args.workers, args.batch_size, threads, False,
                                                   r["breakdown_default"]))
                runs["embed_option"].append(embed(folder, tmp / f"{fmt}-o{i}", ck, args.device, args.workers, args.batch_size, threads, True,
                                                  r["breakdown_option"]))
                print(json.dumps({fmt: runs}), file=sys.stderr, flush=True)  # what is measured so far
            r.update({k: statistics.median(v) for k, v in runs.items()}, runs=runs)
            res["formats"][fmt] = r
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{args.images} files of {args.width}x{args.height} per format on {res['gpu'] or device}; {args.workers} workers, {threads} threads, "
          f"batch {args.batch_size}; medians of {args.repeats}")
    for fmt, r in res["formats"].items():
        print(f"{fmt}:")
        print(f"  reader stage, default / --gpu-letterbox   {r['reader_default']:8.1f} / {r['reader_option']:8.1f} images/s "
              f"({r['reader_option'] / r['reader_default']:.2f}x)")
        print(f"  letterbox + transform on {device.type:<4}            {r['device_letterbox']:8.1f} images/s")
        print(f"  curator embed, default / --gpu-letterbox  {r['embed_default']:8.1f} / {r['embed_option']:8.1f} images/s "
              f"({r['embed_option'] / r['embed_default']:.2f}x)")
        print(f"  max |p_option - p_default| ({args.checkpoint}, {args.distinct} films): {r['prob_max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
