"""CheXzero-style contrastive training: image / report-impression pairs -> a CheXzero checkpoint.

What it does, in order:

1. **Pairs.** ``images`` is a CSV (columns ``path``, relative to the CSV's folder, and
   ``study_key``; e.g. a synthetic archive's ``ground_truth.csv``) or a folder. In a folder a DICOM
   file's key is its StudyInstanceUID (0020,000D); a PNG/JPEG file's key is its file stem or, failing
   that, its parent folder's name (MIMIC-CXR-JPG's ``s5041...`` layout), whichever names a report.
   A folder holding a ``ground_truth.csv`` with those two columns is read through that CSV.
   ``reports`` is a CSV with ``study_key`` and ``report``; the text trained on is the report's
   impression (:func:`curator.reports.extract_impression`), tokenized with open_clip's tokenizer
   (context 77, truncated). Every image of a study is paired with the study's impression.
2. **Images.** Each file is read with :func:`curator.readers.read_image` and letterboxed onto the
   320x320 canvas exactly as :mod:`curator.preprocess` does, once; the uint8 canvases are kept in
   an ``.npy`` memmap next to the output (``CK.pt.cache.npy`` + ``.json``, reused while the files'
   sizes and mtimes are unchanged). Each batch is normalised and resized (bicubic, no antialias) on
   the fly, so the model sees bit for bit what :func:`curator.preprocess.model_input` gives.
   Files that cannot be read are logged and left out, never trained on as black images.
3. **Model.** A fresh CLIP of CheXzero's family (:func:`curator.model.new_clip`) or a CheXzero
   checkpoint to fine-tune (``init``). Loss: CLIP's symmetric cross-entropy over cosine
   similarities scaled by ``exp(logit_scale)``, ``logit_scale`` clamped to [0, ln 100]. AdamW (no
   decay on gains, biases and scalars), linear warm-up then cosine decay. AMP on CUDA.
4. **Validation** (``val_truth``: a ground-truth CSV with ``path`` and 0/1 finding columns). If its
   images are among the training images, the studies (or patients, when the images CSV has a
   ``patient_key``/``patient_id`` column) whose key hashes below ``val_fraction`` are held out of
   training; otherwise the whole file is the validation set. Zero-shot ROC AUC per finding with
   :mod:`curator.zeroshot` and the ("{}", "no {}") templates, finding ``pleural_effusion`` ->
   text ``"pleural effusion"``.
5. **Outputs.** ``CK.pt``: ``torch.save(model.state_dict())``, fp32, OpenAI key layout, nothing
   else, so :func:`curator.model.load_checkpoint` loads it like a published checkpoint.
   ``CK.pt.train-state``: weights, optimizer, schedule, step, RNG states, losses and the config,
   written atomically every ``save_every`` steps and at the end; ``resume`` continues from it.
   ``CK.pt.json``: config, steps, losses, validation AUCs and the command that reproduces the run.

Data order and augmentation are pure functions of ``(seed, step)``, so a resumed run on CPU with
the same thread count ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from curator import constants as C
from curator.constants import ARCHS, DIM_KEYS, MODEL_INPUT_SIZE
from curator.model import encode_text_to_eot
from curator.preprocess import PreprocessCfg, letterbox, normalize, resize_to_input
from curator.reports import extract_impression, split_sentences
from curator.train_cli import add_cli  # noqa: F401  (the parser lives there, free of torch)

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_SUFFIX = ".train-state"
JSON_SUFFIX = ".json"
CACHE_SUFFIX = ".cache"
CACHE_VERSION = 1

DEFAULT_LR_SCRATCH = 5e-4
DEFAULT_LR_FINETUNE = 1e-5
MAX_LOGIT_SCALE = math.log(100.0)

# Columns of a ground-truth CSV that are never findings.
_RESERVED_COLUMNS = {"path", "study_key", "patient_key", "patient_id", "image_id", "series_key", "sop_instance_uid"}
_GROUP_COLUMNS = ("patient_key", "patient_id")


class TrainError(ValueError):
    """A training run that cannot start: bad inputs, no pairs, a config that does not match a resume."""


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` fields are resolved when the run starts."""

    images: str
    reports: str
    out: str
    # Model: fine-tune from a CheXzero checkpoint, or a fresh model of ``arch`` (dims may be overridden).
    init: str | None = None
    arch: str = "small"
    embed_dim: int | None = None
    vision_width: int | None = None
    vision_layers: int | None = None
    patch_size: int | None = None
    image_size: int | None = None
    text_width: int | None = None
    text_layers: int | None = None
    # Optimisation.
    steps: int = 1000
    batch_size: int = 64
    lr: float | None = None  # default: 5e-4 from scratch, 1e-5 fine-tuning
    weight_decay: float = 0.1
    warmup: int | None = None  # default: min(500, steps // 10)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    same_text_positives: bool = False  # treat identical impressions in a batch as positives
    augment: bool = False
    # Text of each pair: a random non-empty subset of the impression's sentences (in order), drawn
    # per image and step, instead of the whole impression.
    sentence_sampling: bool = False
    # Probability, per text and step, that the text's sentences lose their closing full stops, so
    # that text typed the way search queries are ("moderate pulmonary edema") is trained on too.
    query_style: float = 0.0
    seed: int = 0
    # Data.
    dicom_conversion: str = "mimic"
    val_truth: str | None = None
    val_fraction: float = 0.1
    val_findings: list[str] | None = None
    # Run control: may differ between a run and its resumption.
    val_max: int = 1000
    eval_every: int = 0  # 0: evaluate only at the end
    log_every: int = 10
    save_every: int = 500
    stop_at: int | None = None  # stop (saving state) once this step is reached
    max_minutes: float | None = None  # stop (saving state) after this much training time
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    workers: int | None = None  # decode processes for the cache (default: threads)
    device: str | None = None  # None/"auto": CUDA when available
    amp: bool | None = None  # None: on for CUDA
    cache_to_disk: bool = True
    progress: bool | None = None  # tqdm bar; None: when stderr is a terminal
    argv: list[str] | None = None  # the command line that started this run, for the record


# Fields that may change between a run and its resumption without changing what is trained.
RUN_CONTROL_FIELDS = frozenset(
    {
        "val_max", "eval_every", "log_every", "save_every", "stop_at", "max_minutes", "resume", "overwrite",
        "threads", "workers", "device", "amp", "cache_to_disk", "progress", "argv",
    }
)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy with the derived defaults filled in (lr, warmup, threads), checked for sanity."""
    cfg = dataclasses.replace(cfg)
    if cfg.steps < 0:
        raise TrainError(f"steps must be >= 0, got {cfg.steps}")
    if cfg.batch_size < 2:
        raise TrainError(f"batch size must be >= 2 for a contrastive loss, got {cfg.batch_size}")
    if cfg.arch not in ARCHS and cfg.init is None:
        raise TrainError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if not 0.0 <= cfg.query_style <= 1.0:
        raise TrainError(f"query_style is a probability in [0, 1], got {cfg.query_style}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise TrainError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR_FINETUNE if cfg.init else DEFAULT_LR_SCRATCH
    if cfg.warmup is None:
        cfg.warmup = min(500, cfg.steps // 10)
    if cfg.threads is None:
        cfg.threads = torch.get_num_threads()
    if cfg.init and any(getattr(cfg, k) is not None for k in DIM_KEYS):
        log.warning("model dimension flags are ignored with --init: the checkpoint fixes the architecture")
    elif cfg.image_size is not None and int(cfg.image_size) != MODEL_INPUT_SIZE:
        log.warning("--image-size %d: curator embed takes models of %d px inputs only (CheXzero's preprocessing); "
                    "this model will not embed an archive", cfg.image_size, MODEL_INPUT_SIZE)
    if cfg.dicom_conversion not in ("mimic", "voi"):
        raise TrainError(f"dicom_conversion must be 'mimic' or 'voi', got {cfg.dicom_conversion!r}")
    return cfg


def _default_config() -> TrainConfig:
    return TrainConfig(images="", reports="", out="")


def model_dims(cfg: TrainConfig) -> dict[str, int]:
    """The architecture of a fresh model: ``arch``'s preset with any explicit dims on top."""
    dims = dict(ARCHS[cfg.arch])
    for k in DIM_KEYS:
        v = getattr(cfg, k)
        if v is not None:
            dims[k] = int(v)
    return dims


def _training_fields(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL_FIELDS}


def reproduce_command(cfg: TrainConfig, dims: dict[str, int] | None = None) -> str:
    """A ``curator train`` command line that trains the same model from scratch (or from ``init``)."""
    a = ["curator", "train", "--images", cfg.images, "--reports", cfg.reports, "--out", cfg.out]
    if cfg.init:
        a += ["--init", cfg.init]
    else:
        a += ["--arch", cfg.arch]
        base = ARCHS[cfg.arch]
        for k in DIM_KEYS:
            v = (dims or {}).get(k, getattr(cfg, k))
            if v is not None and v != base[k]:
                a += ["--" + k.replace("_", "-"), str(v)]
    a += ["--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr)]
    a += ["--weight-decay", repr(cfg.weight_decay), "--warmup", str(cfg.warmup)]
    if cfg.min_lr_ratio:
        a += ["--min-lr-ratio", repr(cfg.min_lr_ratio)]
    if cfg.grad_clip:
        a += ["--grad-clip", repr(cfg.grad_clip)]
    if cfg.same_text_positives:
        a += ["--same-text-positives"]
    if cfg.augment:
        a += ["--augment"]
    if cfg.sentence_sampling:
        a += ["--sentence-sampling"]
    if cfg.query_style:
        a += ["--query-style", repr(cfg.query_style)]
    if cfg.dicom_conversion != "mimic":
        a += ["--dicom-conversion", cfg.dicom_conversion]
    if cfg.val_truth:
        a += ["--val-truth", cfg.val_truth, "--val-fraction", repr(cfg.val_fraction)]
        if cfg.val_findings:
            a += ["--val-findings", ",".join(cfg.val_findings)]
        if cfg.eval_every:
            a += ["--eval-every", str(cfg.eval_every)]
    a += ["--seed", str(cfg.seed), "--threads", str(cfg.threads)]
    return shlex.join(a)


# --------------------------------------------------------------------------------------------
# Data: image -> study key -> impression


@dataclass
class ImageRef:
    path: str  # canonical (realpath)
    shown: str  # as written in the CSV / relative to the images folder
    study_key: str
    group: str  # unit of the validation split: patient when known, else study


def _read_csv(path: str | Path, required: Sequence[str], what: str):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{p}: no such {what} file")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise TrainError(f"{p}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TrainError(f"{p}: {what} needs columns {', '.join(required)}; missing {', '.join(missing)}")
    return df


def load_reports(path: str | Path) -> dict[str, str]:
    """``study_key -> impression`` from a reports CSV (columns ``study_key``, ``report``)."""
    df = _read_csv(path, ("study_key", "report"), "reports CSV")
    out: dict[str, str] = {}
    for key, text in zip(df["study_key"], df["report"]):
        key = key.strip()
        if key:
            out[key] = extract_impression(text)
    return out


def _images_from_csv(csv: Path, report_keys: set[str]) -> list[ImageRef]:
    """Images listed in a CSV; without a ``study_key`` column, keys come from the files (as in a folder)."""
    df = _read_csv(csv, ("path",), "images CSV")
    base = csv.parent
    gcol = next((c for c in _GROUP_COLUMNS if c in df.columns), None)
    groups = df[gcol].tolist() if gcol else [""] * len(df)
    keys = df["study_key"].tolist() if "study_key" in df.columns else None
    if keys is None:
        log.info("images: %s has no study_key column; keys from DICOM StudyInstanceUID / file names", csv)
    refs = []
    for i, (p, group) in enumerate(zip(df["path"], groups)):
        if not p:
            continue
        full = os.path.join(base, p)
        key = keys[i].strip() if keys is not None else _file_study_key(full, report_keys)
        if key:
            refs.append(ImageRef(os.path.realpath(full), p, key, group.strip() or key))
    return refs


def _file_study_key(path: str, report_keys: set[str]) -> str | None:
    """A file's study key: DICOM StudyInstanceUID; PNG/JPEG file stem or parent folder naming a report."""
    from curator.readers import sniff

    try:
        kind = sniff(path)
    except OSError:
        return None
    if kind == "dicom" or (kind is None and path.lower().endswith((".dcm", ".dicom"))):
        return _dicom_study_uid(path)
    if kind in ("png", "jpeg"):
        stem, parent = Path(path).stem, Path(path).parent.name
        return stem if stem in report_keys else parent if parent in report_keys else None
    return None


def _dicom_study_uid(path: str) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        uid = ds.get("StudyInstanceUID")
        return str(uid).strip() if uid else None
    except Exception:
        return None


def _images_from_dir(root: Path, report_keys: set[str]) -> list[ImageRef]:
    gt = root / "ground_truth.csv"
    if gt.is_file():
        import pandas as pd

        cols = pd.read_csv(gt, nrows=0).columns
        if "path" in cols and "study_key" in cols:
            log.info("images: %s has a ground_truth.csv with path and study_key; pairing through it", root)
            return _images_from_csv(gt, report_keys)
    refs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            key = _file_study_key(full, report_keys)
            if key:
                refs.append(ImageRef(os.path.realpath(full), os.path.relpath(full, root), key, key))
    return refs


def find_images(images: str | Path, report_keys: set[str]) -> list[ImageRef]:
    p = Path(images)
    if p.is_dir():
        return _images_from_dir(p, report_keys)
    if p.is_file():
        return _images_from_csv(p, report_keys)
    raise TrainError(f"{p}: no such images folder or CSV")


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


@dataclass
class ValSet:
    paths: list[str]
    truth: np.ndarray  # (N, F) float: 1, 0 or nan
    findings: list[str]  # truth column names


def _truth_columns(df, explicit: Sequence[str] | None, where: str) -> list[str]:
    import pandas as pd

    if explicit:
        missing = [c for c in explicit if c not in df.columns]
        if missing:
            raise TrainError(f"{where}: no finding column(s) {', '.join(missing)}")
        return list(explicit)
    cols = []
    for c in df.columns:
        if c in _RESERVED_COLUMNS:
            continue
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().all() or (v.isna() & (df[c].astype(str).str.strip() != "")).any():
            continue
        vals = set(v.dropna().unique().tolist())
        if vals <= {-1.0, 0.0, 1.0} and {0.0, 1.0} <= vals:
            cols.append(c)
    if not cols:
        raise TrainError(f"{where}: no 0/1 finding columns")
    return cols


def finding_text(column: str) -> str:
    """Prompt text of a ground-truth column: ``pleural_effusion`` -> ``"pleural effusion"``."""
    return " ".join(column.replace("_", " ").split())


# --------------------------------------------------------------------------------------------
# Canvas cache


def decode_canvas(path: str, dicom_conversion: str = "mimic", canvas_size: int = C.CANVAS_SIZE):
    """``(uint8 canvas, None)`` for a readable file, ``(None, "kind: message")`` otherwise."""
    from curator.readers import ReadError, ReadOptions, read_image

    try:
        res = read_image(path, ReadOptions(dicom_conversion=dicom_conversion))
        canvas = letterbox(res.image, canvas_size)
        return np.asarray(canvas, dtype=np.uint8), None
    except ReadError as exc:
        return None, f"{exc.kind}: {exc}"
    except Exception as exc:  # a decoder bug must not stop a training run
        return None, f"{type(exc).__name__}: {exc}"


def _decode_star(args):
    return decode_canvas(*args)


def _file_sig(path: str) -> list:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _atomic_write_bytes(path: str | Path, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: str | Path) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_canvas_cache(
    paths: Sequence[str],
    prefix: str | None,
    dicom_conversion: str = "mimic",
    canvas_size: int = C.CANVAS_SIZE,
    workers: int = 1,
    progress: bool | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Decode every path once: ``(canvases (N, S, S) uint8, {path: error})``.

    With ``prefix``, the canvases live in ``prefix + ".npy"`` (a memmap) described by
    ``prefix + ".json"``; rows of files whose size and mtime are unchanged are reused. Files that
    failed are tried again (a decoder may have been installed since).
    """
    from tqdm import tqdm

    n = len(paths)
    sigs = [_file_sig(p) for p in paths]
    old = None
    old_rows: dict[tuple, int] = {}
    if prefix and os.path.isfile(prefix + ".json") and os.path.isfile(prefix + ".npy"):
        try:
            meta = json.loads(Path(prefix + ".json").read_text())
            if (
                meta.get("version") == CACHE_VERSION
                and meta.get("canvas_size") == canvas_size
                and meta.get("dicom_conversion") == dicom_conversion
            ):
                old = np.load(prefix + ".npy", mmap_mode="r")
                if (
                    meta["paths"] == list(paths) and meta["sigs"] == sigs
                    and len(old) == n and not any(meta["errors"])
                ):
                    log.info("images: %d canvases from cache %s.npy", n, prefix)
                    return old, {}
                for i, (p, sig, err) in enumerate(zip(meta["paths"], meta["sigs"], meta["errors"])):
                    if not err:
                        old_rows[(p, tuple(sig))] = i
        except Exception as exc:
            log.warning("cache %s unusable (%s); rebuilding", prefix, exc)
            old, old_rows = None, {}

    if prefix:
        tmp_npy = f"{prefix}.tmp{os.getpid()}.npy"
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, canvas_size, canvas_size))
    else:
        arr = np.zeros((n, canvas_size, canvas_size), dtype=np.uint8)
    errors: dict[str, str] = {}
    todo = []
    reused = 0
    for i, (p, s) in enumerate(zip(paths, sigs)):
        k = (p, tuple(s))
        if old is not None and k in old_rows:
            arr[i] = old[old_rows[k]]
            reused += 1
        else:
            todo.append(i)
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="decode", unit="img", disable=None if progress is None else not progress)
    jobs = [(paths[i], dicom_conversion, canvas_size) for i in todo]
    if workers > 1 and len(todo) >= 64:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = ex.map(_decode_star, jobs, chunksize=16)
            for i, (canvas, err) in zip(todo, results):
                if err:
                    errors[paths[i]] = err
                else:
                    arr[i] = canvas
                bar.update(1)
    else:
        for i, job in zip(todo, jobs):
            canvas, err = _decode_star(job)
            if err:
                errors[paths[i]] = err
            else:
                arr[i] = canvas
            bar.update(1)
    bar.close()
    log.info(
        "images: decoded %d file(s) in %.1f s (%d reused from cache, %d unreadable)",
        len(todo), time.time() - t0, reused, len(errors),
    )
    if prefix:
        arr.flush()
        del arr
        os.replace(tmp_npy, prefix + ".npy")
        meta = {
            "version": CACHE_VERSION,
            "canvas_size": canvas_size,
            "dicom_conversion": dicom_conversion,
            "paths": list(paths),
            "sigs": sigs,
            "errors": [errors.get(p) for p in paths],
        }
        _atomic_write_bytes(prefix + ".json", json.dumps(meta).encode())
        arr = np.load(prefix + ".npy", mmap_mode="r")
    return arr, errors


# --------------------------------------------------------------------------------------------
# Loss, schedule


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over ``exp(logit_scale) * cos(image_i, text_j)``.

    The positive of image ``i`` is text ``i``. With ``text_ids``, every text identical to text ``i``
    is a positive too (the target probability is spread over them).
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.t()
    if text_ids is None:
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    same = (text_ids[:, None] == text_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of canvases (N, 1, S, S), 0..255: small affine, brightness, contrast."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)
    ang = u(-5, 5) * math.pi / 180
    scale = u(0.93, 1.07)
    tx, ty = u(-0.04, 0.04), u(-0.04, 0.04)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = u(0.9, 1.1).to(x).view(n, 1, 1, 1)
    bright = u(-10, 10).to(x).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0, 255)


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training run. ``Trainer(cfg).run()`` is :func:`train`; the object exposes the model."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = resolve_config(cfg)
        self._prev_threads = torch.get_num_threads()
        torch.set_num_threads(int(cfg.threads))
        from curator.model import resolve_device

        self.device = resolve_device(cfg.device)
        self.amp = bool(cfg.amp) if cfg.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            log.warning("AMP is only used on CUDA; training in fp32 on %s", self.device)
            self.amp = False
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.out = Path(cfg.out)
        self.state_path = Path(str(self.out) + STATE_SUFFIX)
        self.json_path = Path(str(self.out) + JSON_SUFFIX)

        saved = self._read_state() if cfg.resume else None
        if saved is None and not cfg.resume and self.state_path.exists() and not cfg.overwrite:
            raise TrainError(f"{self.state_path} exists: pass --resume to continue that run or --overwrite to start over")
        if saved is not None:
            self._check_resume_config(saved["config"])

        self._build_model()
        self._build_data()
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.amp_dtype == torch.float16 else None
        self.step = 0
        self.losses: list[float] = []
        self.log_history: list[dict] = []
        self.val_history: list[dict] = []
        self.train_seconds = 0.0
        self._perm_epoch = -1
        self._perm = None
        if saved is not None:
            self._load_state(saved)

    # ---- setup -----------------------------------------------------------------------------

    def _read_state(self) -> dict | None:
        if not self.state_path.exists():
            log.warning("--resume: %s does not exist; starting a new run", self.state_path)
            return None
        try:
            st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainError(f"{self.state_path}: cannot read training state ({type(exc).__name__}: {exc})") from None
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            raise TrainError(f"{self.state_path}: not a curator training state (version {STATE_VERSION})")
        return st

    def _check_resume_config(self, saved: dict) -> None:
        now = _training_fields(self.cfg)
        # A field added after the run was saved has its default there.
        saved = {**_training_fields(_default_config()), **saved}
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
        if diffs:
            raise TrainError("--resume with a different configuration than the saved run: " + "; ".join(diffs))

    def _build_model(self) -> None:
        cfg = self.cfg
        from curator.model import build_clip, new_clip, read_state_dict

        if cfg.init:
            sd = read_state_dict(cfg.init)
            self.model = build_clip(sd)
            v = self.model.visual
            self.dims = dict(
                embed_dim=int(self.model.text_projection.shape[1]),
                vision_width=int(v.conv1.out_channels),
                vision_layers=len(v.transformer.resblocks),
                patch_size=int(v.conv1.kernel_size[0]),
                image_size=int(v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size),
                text_width=int(self.model.token_embedding.weight.shape[1]),
                text_layers=len(self.model.transformer.resblocks),
            )
            log.info("model: fine-tuning %s", cfg.init)
        else:
            self.dims = model_dims(cfg)
            torch.manual_seed(cfg.seed)
            self.model = new_clip(**self.dims)
            log.info("model: new %s CLIP %s", cfg.arch, self.dims)
        self.model = self.model.float().to(self.device).train()
        self.context_length = int(self.model.positional_embedding.shape[0])
        self.prep = PreprocessCfg(input_size=self.dims["image_size"])
        if self.dims["image_size"] > self.prep.canvas_size:
            log.warning("model input %d px is larger than the %d px canvas: images are upsampled", self.dims["image_size"], self.prep.canvas_size)
        n = sum(p.numel() for p in self.model.parameters())
        log.info("model: %.2f M parameters on %s%s", n / 1e6, self.device, " (AMP)" if self.amp else "")

    def _build_data(self) -> None:
        from open_clip.tokenizer import tokenize

        cfg = self.cfg
        impressions = load_reports(cfg.reports)
        if not impressions:
            raise TrainError(f"{cfg.reports}: no reports")
        refs = find_images(cfg.images, set(impressions))
        if not refs:
            raise TrainError(f"{cfg.images}: no images with a study key")
        self.stats: dict[str, int] = {"images_listed": len(refs)}
        paired = [r for r in refs if impressions.get(r.study_key)]
        self.stats["images_without_report"] = len(refs) - len(paired)
        if self.stats["images_without_report"]:
            log.warning("%d image(s) have no report (or an empty one) and are left out", self.stats["images_without_report"])

        # Validation split.
        val_paths: list[str] = []
        val_truth = None
        self.val_findings: list[str] = []
        held: set[str] = set()
        if cfg.val_truth:
            import pandas as pd

            vt = Path(cfg.val_truth)
            df = _read_csv(vt, ("path",), "validation ground truth")
            cols = _truth_columns(df, cfg.val_findings, str(vt))
            vpaths = [os.path.realpath(os.path.join(vt.parent, p)) for p in df["path"]]
            group_of = {r.path: r.group for r in refs}
            overlap = [p for p in vpaths if p in group_of]
            t = np.stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in cols], axis=1)
            t[t < 0] = np.nan  # CheXpert's -1 "uncertain"
            if overlap and cfg.val_fraction == 0:
                keep = [i for i, p in enumerate(vpaths) if p in group_of]
                log.warning("validation: val_fraction 0, so the validation images are training images (in-sample AUC)")
            elif overlap:
                held = {g for g in set(group_of.values()) if _hash_fraction(g) < cfg.val_fraction}
                keep = [i for i, p in enumerate(vpaths) if p in group_of and group_of[p] in held]
                log.info("validation: %d of %d group(s) held out of training (val_fraction %.2f)", len(held), len(set(group_of.values())), cfg.val_fraction)
            else:
                keep = list(range(len(vpaths)))
                log.info("validation: %s is a separate archive; all %d image(s) are validation", vt, len(keep))
            if len(keep) > cfg.val_max:
                keep = sorted(keep, key=lambda i: _hash_fraction("val:" + vpaths[i]))[: cfg.val_max]
                keep.sort()
            val_paths = [vpaths[i] for i in keep]
            val_truth = t[keep]
            self.val_findings = cols
        train_refs = [r for r in paired if r.group not in held]
        self.stats["images_held_out"] = len(paired) - len(train_refs)

        # Decode once.
        all_paths = list(dict.fromkeys([r.path for r in train_refs] + val_paths))
        prefix = str(self.out) + CACHE_SUFFIX if cfg.cache_to_disk else None
        if prefix:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self.canvases, errors = build_canvas_cache(
            all_paths, prefix, cfg.dicom_conversion, self.prep.canvas_size,
            workers=int(cfg.workers or cfg.threads), progress=cfg.progress,
        )
        self.decode_errors = errors
        if errors:
            for p, e in list(errors.items())[:5]:
                log.warning("unreadable, left out: %s (%s)", p, e)
            if len(errors) > 5:
                log.warning("... %d unreadable file(s) in all", len(errors))
        row = {p: i for i, p in enumerate(all_paths)}
        train_refs = [r for r in train_refs if r.path not in errors]
        self.stats["images_unreadable"] = len(errors)
        if len(train_refs) < cfg.batch_size:
            raise TrainError(
                f"{len(train_refs)} readable training image(s) with reports, fewer than one batch of {cfg.batch_size}"
            )

        texts = sorted({impressions[r.study_key] for r in train_refs})
        text_index = {t: i for i, t in enumerate(texts)}
        self.texts = texts
        self.tokens = tokenize(texts, context_length=self.context_length)
        per_step = cfg.sentence_sampling or cfg.query_style > 0
        self.sentences = [split_sentences(t) for t in texts] if per_step else None
        self.train_refs = train_refs
        self.train_rows = np.array([row[r.path] for r in train_refs], dtype=np.int64)
        self.train_text = torch.tensor([text_index[impressions[r.study_key]] for r in train_refs], dtype=torch.long)
        self.stats.update(
            train_images=len(train_refs),
            train_studies=len({r.study_key for r in train_refs}),
            distinct_texts=len(texts),
        )
        fp = hashlib.sha256()
        for r in sorted(train_refs, key=lambda r: r.shown):
            fp.update(f"{r.shown}\t{r.study_key}\t{impressions[r.study_key]}\n".encode())
        self.data_fingerprint = fp.hexdigest()[:16]

        if val_truth is not None:
            ok = [i for i, p in enumerate(val_paths) if p not in errors]
            self.val = ValSet([val_paths[i] for i in ok], val_truth[ok], self.val_findings)
            self.val_rows = np.array([row[val_paths[i]] for i in ok], dtype=np.int64)
            self.stats["val_images"] = len(ok)
            if not ok:
                log.warning("validation: no readable validation images; AUC will not be computed")
        else:
            self.val = None
            self.val_rows = np.zeros(0, dtype=np.int64)
        log.info(
            "data: %d training image(s) from %d studies, %d distinct impressions%s",
            len(train_refs), self.stats["train_studies"], len(texts),
            f", {len(self.val_rows)} validation image(s)" if self.val is not None else "",
        )

    # ---- batches ---------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_rows) // self.cfg.batch_size

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices into ``train_refs`` of step ``step``'s batch: a pure function of (seed, step)."""
        spe = self.steps_per_epoch
        epoch, k = divmod(step, spe)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_rows))
            self._perm_epoch = epoch
        b = self.cfg.batch_size
        return self._perm[k * b : (k + 1) * b]

    def images_for_rows(self, rows: np.ndarray, augment_step: int | None = None) -> torch.Tensor:
        """Model input (N, 3, H, W) of cached canvases, as :func:`curator.preprocess.model_input` gives."""
        order = np.argsort(rows, kind="stable")
        arr = np.empty((len(rows),) + self.canvases.shape[1:], dtype=np.uint8)
        arr[order] = self.canvases[rows[order]]  # sorted reads are kinder to a memmap
        x = torch.from_numpy(arr).to(self.device, non_blocking=True).float().unsqueeze(1)
        if augment_step is not None:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + augment_step)
            x = _augment(x, gen)
        # Bicubic resizing treats channels independently, so resizing the one grey channel and
        # repeating it is bit for bit the 3-channel transform.
        x = resize_to_input(normalize(x, self.prep), self.prep)
        return x.expand(-1, 3, -1, -1).contiguous()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.batch_indices(step)
        images = self.images_for_rows(self.train_rows[idx], step if self.cfg.augment else None)
        tid = self.train_text[idx]
        if self.sentences is not None:
            tokens, tid = self.sampled_texts(tid.tolist(), step)
            return images, tokens.to(self.device), tid.to(self.device)
        return images, self.tokens[tid].to(self.device), tid.to(self.device)

    def batch_texts(self, text_rows: Sequence[int], step: int) -> list[str]:
        """The texts of one batch drawn per step: a pure function of (seed, step, rows).

        Under sentence sampling each sentence of an image's impression is kept with probability 1/2
        (at least one is kept), in its original order; otherwise all are kept. With ``query_style``
        p, each text then loses its sentences' closing full stops with probability p.
        """
        return [text for text, _ in self._draw_texts(text_rows, step)]

    def _draw_texts(self, text_rows: Sequence[int], step: int) -> list[tuple[str, str]]:
        """(text, key) per row: texts with equal keys are the same text (full stops aside)."""
        rng = np.random.default_rng([self.cfg.seed, step, 0x5E17])
        # Drawn from a stream of its own, so that adding query style leaves the sentence draws as they were.
        qrng = np.random.default_rng([self.cfg.seed, step, 0xA5E])
        out = []
        for t in text_rows:
            sents = self.sentences[t]
            if self.cfg.sentence_sampling:
                keep = rng.random(len(sents)) < 0.5
                if not keep.any():
                    keep[rng.integers(len(sents))] = True
                sents = [s for s, k in zip(sents, keep) if k]
            text = " ".join(sents)
            if self.cfg.query_style:
                bare = " ".join(s[:-1] if s.endswith(".") else s for s in sents)
                out.append((bare if qrng.random() < self.cfg.query_style else text, bare))
            else:
                out.append((text, text))
        return out

    def sampled_texts(self, text_rows: Sequence[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of one batch's drawn texts, and ids that are equal exactly where the texts are
        (with query style: where they are but for full stops, so "Small effusion." and "Small
        effusion" are positives of each other, not negatives)."""
        from open_clip.tokenizer import tokenize

        drawn = self._draw_texts(text_rows, step)
        texts = [t for t, _ in drawn]
        distinct = list(dict.fromkeys(texts))
        tokens = tokenize(distinct, context_length=self.context_length)[[distinct.index(t) for t in texts]]
        keys = list(dict.fromkeys(k for _, k in drawn))
        ids = torch.tensor([keys.index(k) for _, k in drawn], dtype=torch.long)
        return tokens, ids

    def _autocast(self):
        import contextlib

        if self.amp:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
        with self._autocast():
            img = self.model.encode_image(images)
            # The causal text tower pools at the end-of-text token: running it only that far is
            # the same computation, gradients included, for a fraction of the 77-token context.
            txt = encode_text_to_eot(self.model, tokens)
        return clip_loss(img, txt, self.model.logit_scale, text_ids if self.cfg.same_text_positives else None)

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, chunk: int = 128) -> dict[str, float]:
        """Zero-shot ROC AUC per finding on the validation images (("{}", "no {}") templates)."""
        if self.val is None or not len(self.val_rows):
            return {}
        from open_clip.tokenizer import tokenize
        from sklearn.metrics import roc_auc_score

        from curator.prompts import Finding, PromptSet
        from curator.zeroshot import prompt_weights, softmax_probabilities

        was_training = self.model.training
        self.model.eval()
        try:
            embs = []
            for s in range(0, len(self.val_rows), chunk):
                x = self.images_for_rows(self.val_rows[s : s + chunk])
                with self._autocast():
                    embs.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
            emb = torch.cat(embs)

            def encode_texts(texts):
                tok = tokenize(list(texts), context_length=self.context_length).to(self.device)
                with self._autocast():
                    return F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu()

            ps = PromptSet(
                findings=tuple(Finding(name=finding_text(c), phrases=(finding_text(c),)) for c in self.val.findings),
                positive=C.POSITIVE_TEMPLATE,
                negative=C.NEGATIVE_TEMPLATE,
                name="validation",
            )
            pos_w, neg_w = prompt_weights(encode_texts, ps)
            probs = softmax_probabilities(emb.numpy(), pos_w, neg_w)
        finally:
            self.model.train(was_training)
        aucs = {}
        for j, col in enumerate(self.val.findings):
            y = self.val.truth[:, j]
            m = ~np.isnan(y)
            if m.sum() and 0 < y[m].sum() < m.sum():
                aucs[col] = float(roc_auc_score(y[m].astype(int), probs[m, j]))
        return aucs

    def _log_eval(self) -> dict[str, float]:
        aucs = self.evaluate()
        if aucs:
            mean = float(np.mean(list(aucs.values())))
            self.val_history.append({"step": self.step, "mean_auc": mean, "auc": aucs})
            log.info(
                "step %d: validation AUC mean %.4f | %s",
                self.step, mean, " ".join(f"{k}={v:.3f}" for k, v in aucs.items()),
            )
        return aucs

    # ---- state -----------------------------------------------------------------------------

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The model's weights as a CheXzero checkpoint holds them: fp32, CPU, OpenAI layout."""
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def _rng_state(self) -> dict:
        np_state = np.random.get_state()
        st = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _py_state_to_list(random.getstate()),
        }
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def _set_rng_state(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        n = st["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
        random.setstate(_py_state_from_list(st["python"]))
        if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda"])

    def save(self, finished: bool) -> None:
        """Write ``CK.pt``, ``CK.pt.train-state`` and ``CK.pt.json``, each atomically."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict_for_checkpoint()
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "dims": dict(self.dims),
            "model": sd,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "base_lr": self.cfg.lr, "warmup": self.cfg.warmup,
                          "total": self.cfg.steps, "min_lr_ratio": self.cfg.min_lr_ratio, "next_step": self.step},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self._rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "log_history": json.dumps(self.log_history),
            "val_history": json.dumps(self.val_history),
            "train_seconds": self.train_seconds,
        }
        _atomic_torch_save(state, self.state_path)
        _atomic_torch_save(sd, self.out)
        _atomic_write_bytes(self.json_path, json.dumps(self.summary(finished, with_losses=False), indent=2).encode())

    def _load_state(self, st: dict) -> None:
        self.model.load_state_dict({k: v.to(self.device) for k, v in st["model"].items()})
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self._set_rng_state(st["rng"])
        self.step = int(st["step"])
        self.losses = [float(x) for x in st["losses"].tolist()]
        self.log_history = json.loads(st["log_history"])
        self.val_history = json.loads(st["val_history"])
        self.train_seconds = float(st["train_seconds"])
        log.info("resumed %s at step %d of %d", self.state_path, self.step, self.cfg.steps)

    def summary(self, finished: bool = True, with_losses: bool = True) -> dict:
        cfg = self.cfg
        tail = self.losses[-max(1, cfg.log_every):]
        done_here = max(1, self.step)
        out = {
            "out": str(self.out),
            "finished": finished,
            "step": self.step,
            "steps": cfg.steps,
            "final_loss": float(np.mean(tail)) if self.losses else None,
            "initial_loss": self.losses[0] if self.losses else None,
            "val_auc": self.val_history[-1]["auc"] if self.val_history else {},
            "val_mean_auc": self.val_history[-1]["mean_auc"] if self.val_history else None,
            "val_history": self.val_history,
            "log_history": self.log_history,
            "data": dict(self.stats, fingerprint=self.data_fingerprint),
            "model": dict(self.dims, parameters=sum(p.numel() for p in self.model.parameters())),
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_step": round(self.train_seconds / done_here, 4) if self.step else None,
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp else None,
            "config": dataclasses.asdict(cfg),
            "command": reproduce_command(cfg, self.dims),
            "argv": cfg.argv,
            "versions": _versions(),
        }
        if with_losses:
            out["losses"] = list(self.losses)
        return out

    # ---- the loop --------------------------------------------------------------------------

    def train_step(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        images, tokens, tid = self.batch(self.step)
        loss = self.loss(images, tokens, tid)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}; the last saved state is unchanged")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        self.losses.append(value)
        return value

    def run(self) -> dict:
        """Train to ``steps`` (or ``stop_at`` / ``max_minutes``), save, and return the summary."""
        torch.set_num_threads(int(self.cfg.threads))
        try:
            return self._run()
        finally:
            torch.set_num_threads(self._prev_threads)

    def _run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        end = cfg.steps if cfg.stop_at is None else min(cfg.steps, max(cfg.stop_at, self.step))
        if self.step >= cfg.steps:
            log.info("already trained %d of %d steps", self.step, cfg.steps)
        if cfg.eval_every and self.step == 0 and self.val is not None:
            self._log_eval()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=None if cfg.progress is None else not cfg.progress)
        t_start = time.time()
        t_last = t_start
        stopped_early = False
        try:
            while self.step < end:
                loss = self.train_step()
                now = time.time()
                self.train_seconds += now - t_last
                t_last = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.log_every == 0 or self.step == end:
                    recent = self.losses[-cfg.log_every:]
                    entry = {
                        "step": self.step,
                        "loss": float(np.mean(recent)),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "logit_scale": float(self.model.logit_scale.detach().exp()),
                        "seconds": round(self.train_seconds, 2),
                    }
                    self.log_history.append(entry)
                    log.info(
                        "step %d/%d loss %.4f lr %.3g scale %.2f (%.3f s/step)",
                        self.step, cfg.steps, entry["loss"], entry["lr"], entry["logit_scale"],
                        self.train_seconds / max(1, self.step),
                    )
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._log_eval()
                    t_last = time.time()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save(finished=False)
                    t_last = time.time()
                if cfg.max_minutes is not None and now - t_start > cfg.max_minutes * 60:
                    log.info("time limit of %.1f min reached at step %d", cfg.max_minutes, self.step)
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            bar.close()
            log.warning("interrupted at step %d; saving state (continue with --resume)", self.step)
            self.save(finished=False)
            raise
        bar.close()
        finished = self.step >= cfg.steps
        if finished and self.val is not None and (not self.val_history or self.val_history[-1]["step"] != self.step):
            self._log_eval()
        self.save(finished=finished)
        if not finished:
            log.info("stopped at step %d of %d%s; continue with --resume", self.step, cfg.steps,
                     " (time limit)" if stopped_early else "")
        log.info("wrote %s (step %d)", self.out, self.step)
        return self.summary(finished)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) per ``cfg``; write the checkpoint, its training state and JSON; return the summary."""
    return Trainer(cfg).run()


def _py_state_to_list(st):
    return [st[0], list(st[1]), st[2]]


def _py_state_from_list(st):
    return (st[0], tuple(st[1]), st[2])


def _versions() -> dict[str, str]:
    import open_clip

    import curator

    return {"curator": curator.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__}


# --------------------------------------------------------------------------------------------
# Command line (the parser is curator.train_cli.add_cli)


_CLI_TO_CFG = {f.name for f in dataclasses.fields(TrainConfig)} - {"argv", "resume", "overwrite"}


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments; with ``--resume``, the saved config plus the given flags."""
    given = {k: getattr(args, k) for k in _CLI_TO_CFG if getattr(args, k, None) is not None}
    if isinstance(given.get("val_findings"), str):
        given["val_findings"] = [c.strip() for c in given["val_findings"].split(",") if c.strip()]
    if getattr(args, "from_scratch", False):
        given["init"] = None
    if given.get("init") == "demo":  # the bundled demo model, as `curator embed --checkpoint demo` names it
        from curator.demo_model import demo_checkpoint_path

        given["init"] = str(demo_checkpoint_path())
    state_path = Path(str(args.out) + STATE_SUFFIX)
    if args.resume and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            saved = dict(st["config"])
        except Exception as exc:
            raise TrainError(f"{state_path}: cannot read training state ({type(exc).__name__}: {exc})") from None
        base = {k: v for k, v in saved.items() if k not in RUN_CONTROL_FIELDS}
        base["out"] = args.out
        cfg = TrainConfig(**{**base, **given})
    else:
        for need in ("images", "reports"):
            if not given.get(need):
                raise TrainError(f"--{need} is required (unless --resume finds a saved run)")
        cfg = TrainConfig(**given)
    cfg.resume = bool(args.resume)
    cfg.overwrite = bool(args.overwrite)
    cfg.argv = list(argv) if argv is not None else ["curator"] + sys.argv[1:]
    return cfg


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def cli_train(args: argparse.Namespace) -> int:
    """The ``curator train`` handler (registered by :mod:`curator.train_cli`)."""
    from curator.model import CheckpointError

    _setup_logging()
    try:
        cfg = config_from_args(args)
        summary = train(cfg)
    except (TrainError, CheckpointError) as exc:
        print(f"curator train: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"curator train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    msg = f"{summary['out']}: step {summary['step']}/{summary['steps']}, loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else f"{summary['out']}: step {summary['step']}"
    if summary["val_mean_auc"] is not None:
        msg += f", validation mean AUC {summary['val_mean_auc']:.4f}"
    print(msg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m curator.train ...``: the same as ``curator train ...``."""
    parser = argparse.ArgumentParser(prog="curator")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        argv = ["train"] + argv
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
