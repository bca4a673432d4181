"""Embed throughput: curator embed vs CheXzero's published flow, and the bound it should reach.

Prints images/s for
  (a) `curator embed` (the full pipeline: walk, decode in workers, batched model, workspace write),
  (b) a baseline following CheXzero's published flow: decode and pad-resize each image, then
      per-image inference, positive and negative prompts in separate passes over the images,
  (c) model only: batched image encoder on pre-decoded tensors,
  (d) decode + preprocess only (same worker count as (a)),
and the ratios (a)/(b) and (a) / (1 / (1/c + 1/d)). Each repeat measures (c), (d), (a) and (b)
back to back on the same files, all in one process, and computes its own ratios, so a change in
the machine's speed between repeats (a shared machine) moves numerator and denominator together;
the figures printed are medians over --repeats (ratios: the median of the per-repeat ratios).
Targets (issue 2, 2-core CPU, ViT-B/32-sized checkpoint): (a)/(b) >= 4.0 and (a) >= 0.9 x bound.

    python benchmarks/embed_throughput.py --images 64 --format jpeg --format dicom
    python benchmarks/embed_throughput.py --device cuda --images 2048 --batch-size 256 --workers 16 --json   # a GPU node
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the curator command sets it (see curator/cli.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_archive(folder: Path, n: int, fmt: str, width: int, height: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    paths = []
    for i in range(n):
        img = base + rng.normal(0, 0.05, (height, width)).astype(np.float32) + 0.2 * ((xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (rng.uniform(0.1, 0.4) * width) ** 2)
        img = np.clip(img, 0, 1)
        if fmt == "jpeg":
            p = folder / f"img{i:04d}.jpg"
            Image.fromarray((img * 255).astype(np.uint8)).save(p, quality=90)
        elif fmt == "dicom":
            p = folder / f"img{i:04d}.dcm"
            write_plain_dicom(p, (img * 4095).astype(np.uint16), i)
        else:
            raise ValueError(fmt)
        paths.append(p)
    return paths


def write_plain_dicom(path: Path, pixels: np.ndarray, i: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = f"BENCH{i:04d}"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(path), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), "series"])
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def vit_b32_checkpoint(path: Path) -> Path:
    from curator.model import new_clip

    torch.manual_seed(0)
    torch.save(new_clip().state_dict(), path)
    return path


def read_options(fast_jpeg: bool):
    from curator import constants as C
    from curator.readers import ReadOptions

    return ReadOptions(jpeg_draft_min_side=C.CANVAS_SIZE if fast_jpeg else None)


def machine(device: torch.device) -> dict:
    """The head of a GPU benchmark's result: device, GPU name, torch version, CPU cores."""
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
            "cores": os.cpu_count()}


def run_timings(ws: Path | str) -> dict:
    """Where the workspace's latest run spent its seconds (its run record): total, waiting for the
    readers, the device stages, the model."""
    from curator.workspace import Workspace

    timings = json.loads(Workspace(ws).read_table("runs").to_pylist()[-1]["timings"])
    return {k: round(v, 3) for k, v in timings.items() if v is not None}


def timed_embed(archive: Path, ws: Path, ck: str, device: str, workers: int, batch: int, threads: int, read_options,
                breakdown: list | None = None, **config):
    """One `curator embed` run into a fresh workspace; its summary (``breakdown`` gets its stage
    times). ``config``: further EmbedConfig fields (e.g. overlap, worker_jpeg_share)."""
    from curator.pipelines.embed import EmbedConfig, run_embed

    s = run_embed(EmbedConfig(archives=[str(archive)], workspace=str(ws), checkpoints=[ck], device=device, progress=False, workers=workers,
                              batch_size=batch, threads=threads, read_options=read_options, **config))
    assert s.processed and not s.failed, s.lines()
    if breakdown is not None:
        breakdown.append(run_timings(ws))
    return s


def bench_curator(archive: Path, ck: Path, workers: int, batch: int, threads: int, device: str = "cpu", fast_jpeg: bool = False,
                  breakdown: list | None = None) -> float:
    from curator.model import load_checkpoints
    from curator.pipelines.embed import EmbedConfig, run_embed

    cks = load_checkpoints([ck], device)
    with tempfile.TemporaryDirectory() as ws:
        t0 = time.perf_counter()
        s = run_embed(EmbedConfig(archives=[str(archive)], workspace=ws, checkpoints=[str(ck)], device=device, workers=workers, batch_size=batch,
                                  threads=threads, progress=False, read_options=read_options(fast_jpeg)), checkpoints=cks)
        dt = time.perf_counter() - t0
        if breakdown is not None:
            breakdown.append(run_timings(ws))
    assert s.processed and not s.failed, s.lines()
    return s.processed / dt


def bench_chexzero_baseline(paths: list[Path], ck: Path, threads: int, device: str = "cpu") -> float:
    """CheXzero's flow: preprocess every file to a 320 canvas, then batch-size-1 inference per template
    (on a GPU in float32, as CheXzero's model is loaded)."""
    from curator import zeroshot
    from curator.model import load_checkpoint
    from curator.preprocess import letterbox, normalize, resize_to_input, canvas_to_tensor
    from curator.prompts import default_prompt_set
    from curator.readers import ReadOptions, read_image

    torch.set_num_threads(threads)
    ck_ = load_checkpoint(ck, device)
    ps = default_prompt_set()

    @torch.inference_mode()
    def encode_image(x):
        if device == "cpu":
            return ck_.encode_images(x)
        return torch.nn.functional.normalize(ck_.model.encode_image(x.to(device)).float(), dim=-1)

    @torch.inference_mode()
    def full_context_texts(texts):  # CheXzero: clip.tokenize -> model.encode_text over all 77 positions
        from open_clip.tokenizer import tokenize

        return torch.nn.functional.normalize(ck_.model.encode_text(tokenize(list(texts)).to(device)).float(), dim=-1)

    t0 = time.perf_counter()
    canvases = [np.asarray(letterbox(read_image(p, ReadOptions()).image)) for p in paths]  # img_to_hdf5
    for template in (ps.positive, ps.negative):  # run_softmax_eval: one pass per template
        w = zeroshot.template_weights(full_context_texts, ps, template)
        for c in canvases:  # DataLoader(batch_size=1)
            x = resize_to_input(normalize(canvas_to_tensor(c))).unsqueeze(0)
            feats = encode_image(x)
            _ = (feats @ w.to(feats.device)).cpu()  # CheXzero collects each prediction on the host
    return len(paths) / (time.perf_counter() - t0)


def bench_model_only(n: int, ck: Path, batch: int, threads: int, device: str = "cpu") -> float:
    from curator.model import load_checkpoint

    torch.set_num_threads(threads)
    ck_ = load_checkpoint(ck, device)
    x = torch.randn(n, 3, 224, 224)
    if device != "cpu":
        x = x.pin_memory()  # as the pipeline's batches are
    ck_.encode_images(x[:batch]).cpu()  # warm-up (and, on a GPU, kernel selection)
    t0 = time.perf_counter()
    outs = [ck_.encode_images(x[i : i + batch]) for i in range(0, n, batch)]
    _ = [o.cpu() for o in outs]  # the pipeline takes every embedding back to the host
    return n / (time.perf_counter() - t0)


def bench_decode_only(paths: list[Path], workers: int, batch: int, fast_jpeg: bool = False) -> float:
    """The reader stage alone, fed exactly as `curator embed` feeds it."""
    from curator.discover import walk
    from curator.pipelines.embed import EmbedConfig, batches

    t0 = time.perf_counter()
    entries = list(walk([paths[0].parent]))
    cfg = EmbedConfig(archives=[], workspace="", checkpoints=[], workers=workers, batch_size=batch, read_options=read_options(fast_jpeg))
    n = sum(len(b["rows"]) for b in batches(entries, cfg))
    assert n == len(paths)
    return n / (time.perf_counter() - t0)


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--format", action="append", choices=["jpeg", "dicom"], help="repeatable (default: jpeg and dicom)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode workers for (a) and (d) (default: curator's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: number of cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: (a), (b) and (c) run there; the bound on a GPU is min(c, d), "
                    "decode (CPU workers) and model (GPU) running side by side")
    ap.add_argument("--fast-jpeg", action="store_true", help="(a) and (d) with curator's --fast-jpeg read path (JPEG only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    workers = args.workers if args.workers is not None else min(8, cores)
    torch.set_num_threads(threads)
    results = {"cores": cores, "threads": threads, "workers": workers, "batch_size": args.batch_size, "torch": torch.__version__,
               "device": args.device, "fast_jpeg": args.fast_jpeg, "formats": {}}
    if args.device != "cpu":
        results["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = vit_b32_checkpoint(tmp / "vitb32.pt")
        for fmt in args.format or ["jpeg", "dicom"]:
            paths = make_archive(tmp / fmt, args.images, fmt, args.width, args.height)
            runs: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "d", "bound", "a_over_b", "a_over_bound")}
            breakdown: list[dict] = []
            for _ in range(args.repeats):
                c = bench_model_only(args.images, ck, args.batch_size, threads, args.device)
                d = bench_decode_only(paths, workers, args.batch_size, args.fast_jpeg)
                a = bench_curator(tmp / fmt, ck, workers, args.batch_size, threads, args.device, args.fast_jpeg, breakdown)
                b = bench_chexzero_baseline(paths, ck, threads, args.device)
                # On the CPU decode and model share the cores (their times add); with a GPU they run side by side.
                bound = 1 / (1 / c + 1 / d) if args.device == "cpu" else min(c, d)
                for k, v in zip(runs, (a, b, c, d, bound, a / b, a / bound)):
                    runs[k].append(v)
            a, b, c, d, bound, a_over_b, a_over_bound = (statistics.median(v) for v in runs.values())
            r = {"a_curator": a, "b_chexzero_flow": b, "c_model_only": c, "d_decode_only": d, "bound": bound,
                 "a_over_b": a_over_b, "a_over_bound": a_over_bound, "runs": runs, "a_breakdown": breakdown}
            results["formats"][fmt] = r
            if not args.json:
                print(f"{fmt} ({args.images} images {args.width}x{args.height}, {args.device}, {cores} cores, {threads} threads, {workers} workers, "
                      f"batch {args.batch_size}{', fast JPEG path' if args.fast_jpeg else ''}; medians of {args.repeats})")
                print(f"  (a) curator embed        {a:7.2f} images/s")
                print(f"  (b) CheXzero flow        {b:7.2f} images/s")
                print(f"  (c) model only           {c:7.2f} images/s")
                print(f"  (d) decode+preprocess    {d:7.2f} images/s")
                print(f"  bound {'1/(1/c+1/d)' if args.device == 'cpu' else 'min(c, d)  '}        {bound:7.2f} images/s")
                print(f"  (a)/(b)                  {a_over_b:7.2f}   (target >= 4.0; per repeat: {_fmt(runs['a_over_b'])})")
                print(f"  (a)/bound                {a_over_bound:7.2f}   (target >= 0.9; per repeat: {_fmt(runs['a_over_bound'])})")
                sys.stdout.flush()
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
