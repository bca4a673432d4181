"""`curator embed --fast-jpeg` (reduced decoding) vs the exact path.

Writes a synthetic archive of full-size radiographs (`curator synth --format png` at --size
pixels), re-encoded per --format: `jpeg` files (quality 95, as MIMIC-CXR-JPG ships them; decoded
at reduced scale in the DCT domain), `dicom-j2k` (12-bit JPEG 2000 lossless DICOMs, as many PACS
store them; decoded from a lower resolution level of the codestream) or `dicom-jpeg` (8-bit JPEG
baseline DICOMs, quality 95; DCT domain). Then prints, per format, medians of --repeats runs in
this one process:
  decode + preprocess only, exact vs fast (one process, one thread),
  `curator embed` end to end, exact vs fast (--workers decode workers),
  and how far the fast path moves the probabilities of the given checkpoint (default: the bundled
  demo model) from the exact path: max and mean |p_fast - p_exact| over every image and finding.

    python benchmarks/fast_jpeg.py --studies 48 --size 2500 --repeats 3 --format jpeg --format dicom-j2k --format dicom-jpeg
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


def source_films(folder: Path, studies: int, size: int) -> list[Path]:
    src = folder / "src"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "curator.cli", "-q", "synth", str(src), "--studies", str(studies), "--seed", "21",
                        "--format", "png", "--image-size", str(size), "--no-broken", "--workers", "2"], check=True)
    return sorted(q for q in src.rglob("*") if q.suffix in (".png", ".jpg"))


def archive(folder: Path, films: list[Path], fmt: str) -> list[Path]:
    """The films re-encoded as ``fmt`` in ``folder``."""
    import io

    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

    folder.mkdir()
    out = []
    for i, p in enumerate(films):
        with Image.open(p) as im:
            gray = im.convert("L")
        if fmt == "jpeg":
            dst = folder / f"img{i:04d}.jpg"
            gray.save(dst, quality=95)
            out.append(dst)
            continue
        dst = folder / f"img{i:04d}.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(dst)])
        ds = FileDataset(str(dst), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(dst), "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(dst), "series"])
        ds.PatientID, ds.Modality, ds.ViewPosition = f"FAST{i:04d}", "DX", "PA"
        ds.Rows, ds.Columns = gray.size[1], gray.size[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        if fmt == "dicom-j2k":
            a = np.asarray(gray).astype(np.uint16)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
            ds.PixelData = ((a << 4) | (a >> 4)).tobytes()  # 8 -> 12 bits
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        elif fmt == "dicom-jpeg":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            buf = io.BytesIO()
            gray.save(buf, format="JPEG", quality=95)
            ds.PixelData = encapsulate([buf.getvalue()])
            ds["PixelData"].VR = "OB"
            meta.TransferSyntaxUID = JPEGBaseline8Bit
        else:
            raise ValueError(fmt)
        ds.save_as(dst, enforce_file_format=True)
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
    ap.add_argument("--format", action="append", choices=["jpeg", "dicom-j2k", "dicom-jpeg"], help="repeatable (default: jpeg)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from curator.cli import resolve_checkpoint_arg
    from curator.readers import ReadOptions

    ck = resolve_checkpoint_arg(args.checkpoint)
    exact, fast = ReadOptions(), ReadOptions(jpeg_draft_min_side=320)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        films = source_films(tmp, args.studies, args.size)
        for fmt in args.format or ["jpeg"]:
            paths = archive(tmp / fmt, films, fmt)
            dec = {"exact": [], "fast": []}
            emb = {"exact": [], "fast": []}
            for r in range(args.repeats):
                for name, opt in (("exact", exact), ("fast", fast)):
                    dec[name].append(decode_rate(paths, opt))
                    emb[name].append(embed(tmp / fmt, tmp / f"ws-{fmt}-{name}-{r}", ck, opt, args.workers, args.threads))
            pe, pf = probabilities(tmp / f"ws-{fmt}-exact-0"), probabilities(tmp / f"ws-{fmt}-fast-0")
            assert pe.keys() == pf.keys()
            dev = np.abs(np.stack([pf[k] - pe[k] for k in pe]))
            med = {k: statistics.median(v) for k, v in dec.items()}
            mee = {k: statistics.median(v) for k, v in emb.items()}
            print(f"{fmt}: {len(paths)} films, longer side {args.size} px; {args.workers} workers, {args.threads} thread(s); medians of {args.repeats}")
            print(f"  decode+preprocess, exact   {med['exact']:7.2f} images/s")
            print(f"  decode+preprocess, fast    {med['fast']:7.2f} images/s   ({med['fast'] / med['exact']:.2f}x)")
            print(f"  curator embed, exact       {mee['exact']:7.2f} images/s")
            print(f"  curator embed, --fast-jpeg {mee['fast']:7.2f} images/s   ({mee['fast'] / mee['exact']:.2f}x)")
            print(f"  |p_fast - p_exact| over {dev.shape[0]} images x {dev.shape[1]} findings: max {dev.max():.4f}, mean {dev.mean():.5f}, "
                  f"99th percentile {np.percentile(dev, 99):.4f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
