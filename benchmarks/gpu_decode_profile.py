"""Where `--gpu-jpeg`'s device stage spends its time: the JPEG decoder or the letterbox.

For synthetic grayscale films (JPEG quality 95) of each --size, in one process, medians of --repeats:
  decode            torchvision's decode_jpeg of a batch of --batch files on --device (nvJPEG on a GPU),
                    in images/s and megapixels/s of decoded film;
  letterbox         curator's exact Lanczos letterbox of the decoded batch, film by film and as
                    same-sized stacks (device_jpeg.letterbox_all, what the pipeline uses on a GPU);
  decode+inputs     device_jpeg.model_inputs(device_jpeg.decode(...)), the whole device stage;
  Pillow, one core  the exact path's decoder (libjpeg-turbo) on one CPU core, for scale.
A fixed-function decoder (the hardware JPEG engines of A100/H100/H200, which nvJPEG uses for
baseline files) shows as megapixels/s that stay flat across film sizes and batch sizes.

    python benchmarks/gpu_decode_profile.py --device cuda --size 2000x2500 --size 1000x1250 --batch 64 --batch 256
    python benchmarks/gpu_decode_profile.py --device cpu --size 1000x1250 --batch 8 --films 8 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from embed_throughput import machine, make_archive  # noqa: E402  (sibling benchmark script)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(fn, items: int, repeats: int, device: torch.device) -> float:
    """Items per second through ``fn()``, median of ``repeats`` timed calls after one warm-up."""
    fn()
    _sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        rates.append(items / (time.perf_counter() - t0))
    return statistics.median(rates)


def profile(folder: Path, width: int, height: int, films: int, batches: list[int], repeats: int, device: torch.device) -> dict:
    from PIL import Image

    from curator import device_jpeg

    paths = make_archive(folder, films, "jpeg", width, height)
    data = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
        data.append(buf.getvalue())
    mp = width * height / 1e6
    out: dict = {"size": [width, height], "megapixels": mp, "mean_file_mb": sum(map(len, data)) / len(data) / 1e6}

    def pil_decode():
        for d in data:
            with Image.open(io.BytesIO(d)) as im:
                im.load()

    torch.set_num_threads(1)
    out["pillow_one_core_ips"] = median_rate(pil_decode, len(data), repeats, torch.device("cpu"))
    torch.set_num_threads(os.cpu_count() or 1)
    for batch in batches:
        blobs = [torch.frombuffer(bytearray(data[i % len(data)]), dtype=torch.uint8) for i in range(batch)]
        if device.type == "cuda":
            blobs = [b.pin_memory() for b in blobs]
        images = device_jpeg.decode(blobs, device)
        assert all(im is not None for im in images)
        row = {
            "decode_ips": median_rate(lambda: device_jpeg.decode(blobs, device), batch, repeats, device),
            "letterbox_each_ips": median_rate(lambda: [device_jpeg.letterbox(im) for im in images], batch, repeats, device),
            "letterbox_stacked_ips": median_rate(lambda: device_jpeg.letterbox_all(images, stack=True), batch, repeats, device),
            "decode_and_inputs_ips": median_rate(lambda: device_jpeg.model_inputs(device_jpeg.decode(blobs, device)), batch, repeats, device),
        }
        row["decode_mps"] = row["decode_ips"] * mp
        out[f"batch_{batch}"] = row
        print(json.dumps(out), file=sys.stderr, flush=True)  # what is measured so far
        del images, blobs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", action="append", help="WxH, repeatable (default: 2000x2500)")
    ap.add_argument("--batch", type=int, action="append", help="files per decode call, repeatable (default: 64)")
    ap.add_argument("--films", type=int, default=16, help="distinct films per size (a batch repeats them)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.size or ["2000x2500"])]
    res = {**machine(device), "profiles": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (w, h) in enumerate(sizes):
            res["profiles"].append(profile(Path(tmp) / f"s{i}", w, h, args.films, args.batch or [64], args.repeats, device))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
