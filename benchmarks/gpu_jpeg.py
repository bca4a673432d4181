"""`curator embed --gpu-jpeg` (JPEG decoded and letterboxed on the model's device) vs the exact path.

Writes --distinct synthetic full-size grayscale JPEG films (--width x --height, quality 95) and
links them up to --images files, then prints, medians of --repeats runs in this one process:
  decode + preprocess only: the exact reader stage (--workers processes) and the device stage
      (a batch of --batch-size files decoded, letterboxed and turned into model inputs there);
  `curator embed` end to end, exact vs --gpu-jpeg, with a ViT-B/32-sized checkpoint (random weights);
      --gpu-jpeg three ways: all on the device in turn with the model, the device stage beside the
      model (overlap), beside it with the reader workers' adaptive share (curator's GPU default),
      that with --gpu-letterbox (the workers' share only decoded by them), and that with --fast-jpeg
      (the workers' share decoded in the DCT domain; the GPU's films stay exact);
  how far the device path moves things on the distinct films: share of 320x320 canvas pixels that
      differ from the exact path's and the largest difference (grey levels), and
      max |p_device - p_exact| over every film and finding with --checkpoint (default: the bundled
      demo model).
On a CPU (--device cpu) the device stage is torchvision's libjpeg-turbo decoder and the same
resize code, which the tests show equal to the exact path; the figures that matter come from a GPU:

    python benchmarks/gpu_jpeg.py --device cuda --images 2048 --distinct 64 --workers 16 --batch-size 256 --json
    python benchmarks/gpu_jpeg.py --device cpu --images 64 --distinct 16 --workers 2 --batch-size 32
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
from embed_throughput import bench_decode_only, machine, make_archive, timed_embed, vit_b32_checkpoint  # noqa: E402  (sibling benchmark scripts)
from ray_overhead import probabilities  # noqa: E402


def films(folder: Path, distinct: int, total: int, width: int, height: int) -> list[Path]:
    """``distinct`` films, hard-linked (copied where links fail) up to ``total`` files."""
    from PIL import Image

    src = make_archive(folder / "src", distinct, "jpeg", width, height)
    for p in src:  # quality 95, as MIMIC-CXR-JPG ships them (make_archive writes 90)
        with Image.open(p) as im:
            im.load()
            im.save(p, quality=95)
    return links(src, folder / "all", total)


def links(src: list[Path], out: Path, total: int) -> list[Path]:
    """``total`` files in ``out``, hard links to ``src`` in turn (copies where links fail)."""
    out.mkdir()
    paths = []
    for i in range(total):
        dst = out / f"f{i:06d}{src[i % len(src)].suffix}"
        try:
            os.link(src[i % len(src)], dst)
        except OSError:
            dst.write_bytes(src[i % len(src)].read_bytes())
        paths.append(dst)
    return paths


def device_stage_rate(paths: list[Path], device: torch.device, batch: int) -> float:
    """Files per second through decode + letterbox + model input on ``device``, file bytes already in memory."""
    from curator import device_jpeg

    blobs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    if device.type == "cuda":
        blobs = [b.pin_memory() for b in blobs]
    device_jpeg.model_inputs([im for im in device_jpeg.decode(blobs[:2], device)])  # warm-up (nvJPEG handles, resize matrices)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        images = device_jpeg.decode(blobs[i : i + batch], device)
        assert all(im is not None for im in images)
        device_jpeg.model_inputs(images)
    _sync(device)
    return len(blobs) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def canvas_deviation(paths: list[Path], device: torch.device) -> tuple[float, int]:
    """Share of canvas pixels where the device path differs from the exact one, and the largest difference."""
    from curator import device_jpeg
    from curator.preprocess import letterbox
    from curator.readers import read_image

    differ, total, worst = 0, 0, 0
    for p in paths:
        exact = np.asarray(letterbox(read_image(p).image), dtype=np.int16)
        (image,) = device_jpeg.decode([torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)], device)
        dev = device_jpeg.letterbox(image).cpu().numpy().astype(np.int16)
        d = np.abs(dev - exact)
        differ, total, worst = differ + int(np.count_nonzero(d)), total + d.size, max(worst, int(d.max()))
    return differ / total, worst


def embed(archive: Path, ws: Path, ck: str, device: str, workers: int, batch: int, threads: int, on_device: bool,
          breakdown: list | None = None, overlap: bool | None = False, share: float | str = 0.0, letterbox: bool = False,
          fast: bool = False) -> float:
    """images/s of one run. On the device path: ``overlap`` (the device stage beside the model; None:
    curator's default), ``share`` (the reader workers' share of the JPEGs, or "auto") and
    ``letterbox`` (--gpu-letterbox: the JPEGs the workers decode are letterboxed on the device) and
    ``fast`` (--fast-jpeg: the JPEGs the workers decode are decoded in the DCT domain)."""
    from curator.readers import ReadOptions

    extra = {"overlap": overlap, "worker_jpeg_share": share} if on_device else {}
    options = ReadOptions(jpeg_on_device=on_device, letterbox_on_device=letterbox, jpeg_draft_min_side=320 if fast else None)
    s = timed_embed(archive, ws, ck, device, workers, batch, threads, options, breakdown, **extra)
    if on_device and share == 0.0:  # all of them on the device, or the rate is not the device path's (e.g. no nvJPEG in this torchvision)
        assert s.device_decoded == s.processed and not s.device_rejected, s.lines()
    if on_device and breakdown is not None:  # the split between the device and the workers
        breakdown[-1].update(device_decoded=s.device_decoded, worker_decoded=s.worker_decoded, worker_share=s.worker_share)
    return s.processed / s.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--distinct", type=int, default=16)
    ap.add_argument("--device-images", type=int, default=None,
                    help="files for the --gpu-jpeg embed runs (default: --images); more than --images where that path is so fast "
                         "that a run's fixed costs (model load, prompts, worker start) would hide its rate")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: number of cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint", default="demo", help="for the probability deviation (default: the bundled demo model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)

    from curator.cli import resolve_checkpoint_arg

    res: dict = {**machine(device), "workers": args.workers, "threads": threads, "batch_size": args.batch_size, "images": args.images,
                 "distinct": args.distinct, "size": [args.width, args.height]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = films(tmp, args.distinct, args.images, args.width, args.height)
        distinct = sorted((tmp / "src").iterdir())
        device_archive = tmp / "all"
        if args.device_images and args.device_images != args.images:
            device_archive = tmp / "many"
            links(distinct, device_archive, args.device_images)
        res["device_images"] = args.device_images or args.images
        ck = str(vit_b32_checkpoint(tmp / "vitb32.pt"))
        share, worst = canvas_deviation(distinct, device)
        res["canvas_pixels_differing"], res["canvas_max_diff"] = share, worst
        demo = resolve_checkpoint_arg(args.checkpoint)
        embed(tmp / "src", tmp / "p-exact", demo, args.device, args.workers, args.batch_size, threads, False)
        embed(tmp / "src", tmp / "p-dev", demo, args.device, args.workers, args.batch_size, threads, True)
        pe, pd = probabilities(tmp / "p-exact"), probabilities(tmp / "p-dev")
        assert pe.keys() == pd.keys()
        dev = np.abs(np.stack([pd[k] - pe[k] for k in pe]))
        res["prob_max_abs_diff"], res["prob_mean_abs_diff"] = float(dev.max()), float(dev.mean())
        print(json.dumps(res), file=sys.stderr, flush=True)  # what is measured so far, in case the rest runs out of time
        # the device path three ways: in turn with the model, all on the device (as first measured); beside the model
        # (overlap); beside the model with the reader workers decoding an adaptive share (curator's default on a GPU)
        # and the same with --gpu-letterbox, so the workers' share is only decoded by them, or with --fast-jpeg, so
        # the workers' share is decoded in the DCT domain
        variants = {"embed_device": (False, 0.0, False, False), "embed_device_overlap": (True, 0.0, False, False),
                    "embed_device_auto": (True, "auto", False, False), "embed_device_auto_letterbox": (True, "auto", True, False),
                    "embed_device_auto_fast": (True, "auto", False, True)}
        runs: dict[str, list[float]] = {"decode_exact": [], "decode_fast": [], "decode_device": [], "embed_exact": [],
                                        **{k: [] for k in variants}}
        for r in range(args.repeats):
            runs["decode_exact"].append(bench_decode_only(paths, args.workers, args.batch_size))
            runs["decode_fast"].append(bench_decode_only(paths, args.workers, args.batch_size, fast_jpeg=True))
            runs["decode_device"].append(device_stage_rate(paths, device, args.batch_size))
            runs["embed_exact"].append(embed(tmp / "all", tmp / f"e{r}", ck, args.device, args.workers, args.batch_size, threads, False,
                                             res.setdefault("breakdown_exact", [])))
            for name, (overlap, worker_share, letterbox, fast) in variants.items():
                runs[name].append(embed(device_archive, tmp / f"{name}{r}", ck, args.device, args.workers, args.batch_size, threads, True,
                                        res.setdefault(f"breakdown_{name.removeprefix('embed_')}", []), overlap=overlap, share=worker_share,
                                        letterbox=letterbox, fast=fast))
            print(json.dumps({**runs, **{k: v for k, v in res.items() if k.startswith("breakdown_")}}), file=sys.stderr, flush=True)
        res.update({k: statistics.median(v) for k, v in runs.items()}, runs=runs)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{args.images} JPEG files ({args.distinct} distinct films, {args.width}x{args.height}, q95) on {res['gpu'] or device}; "
          f"{args.workers} workers, {threads} threads, batch {args.batch_size}; medians of {args.repeats}")
    print(f"  decode+preprocess, exact (workers)      {res['decode_exact']:8.1f} images/s")
    print(f"  decode+preprocess, --fast-jpeg (workers){res['decode_fast']:8.1f} images/s")
    print(f"  decode+preprocess, on {device.type:<4}             {res['decode_device']:8.1f} images/s")
    print(f"  curator embed, exact                    {res['embed_exact']:8.1f} images/s")
    print(f"  curator embed, --gpu-jpeg               {res['embed_device']:8.1f} images/s   ({res['embed_device'] / res['embed_exact']:.2f}x; "
          f"{res['device_images']} files; all on the device, in turn with the model)")
    print(f"    ... device stage beside the model     {res['embed_device_overlap']:8.1f} images/s   "
          f"({res['embed_device_overlap'] / res['embed_device']:.2f}x the line above)")
    auto = res["breakdown_device_auto"][-1]
    print(f"    ... and the workers' adaptive share   {res['embed_device_auto']:8.1f} images/s   "
          f"({res['embed_device_auto'] / res['embed_device']:.2f}x; last run: {auto['worker_decoded']} of {res['device_images']} "
          f"by the workers, share {auto['worker_share']:.2f} at the end)")
    auto = res["breakdown_device_auto_letterbox"][-1]
    print(f"    ... and --gpu-letterbox               {res['embed_device_auto_letterbox']:8.1f} images/s   "
          f"({res['embed_device_auto_letterbox'] / res['embed_device']:.2f}x; last run: {auto['worker_decoded']} by the workers, "
          f"share {auto['worker_share']:.2f})")
    auto = res["breakdown_device_auto_fast"][-1]
    print(f"    ... and --fast-jpeg (workers' share)  {res['embed_device_auto_fast']:8.1f} images/s   "
          f"({res['embed_device_auto_fast'] / res['embed_device']:.2f}x; last run: {auto['worker_decoded']} by the workers, "
          f"share {auto['worker_share']:.2f})")
    print(f"  canvas pixels differing from the exact path: {100 * share:.4f}% (largest difference {worst} grey levels)")
    print(f"  |p_device - p_exact| ({args.checkpoint}, {dev.shape[0]} films x {dev.shape[1]} findings): max {dev.max():.2e}, mean {dev.mean():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
