"""The ``curator train`` command line: the parser only, so that ``curator --help`` does not import torch.

Training itself is :mod:`curator.train`, imported when the command runs.
"""

from __future__ import annotations

import argparse

from curator.constants import ARCHS, DIM_KEYS


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``curator train`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a CheXzero-style CLIP on image / report pairs",
        description=(
            "CheXzero's contrastive pretraining on image / report-impression pairs. Writes OUT (a "
            "CheXzero-format checkpoint), OUT.train-state (for --resume) and OUT.json (config, "
            "losses, validation AUCs and the command that reproduces the run)."
        ),
    )
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of DICOM/PNG/JPEG files, or a CSV with columns path (relative to the CSV) and study_key (e.g. ARCHIVE/ground_truth.csv)")
    g.add_argument("--reports", help="CSV with columns study_key, report (full report text; the impression is extracted)")
    g.add_argument("--out", required=True, help="checkpoint to write (CheXzero format)")
    g.add_argument("--dicom-conversion", choices=["mimic", "voi"], default=None, help="DICOM to 8-bit conversion (default mimic)")
    g.add_argument("--val-truth", default=None, help="ground-truth CSV (path + 0/1 finding columns) for zero-shot validation AUC")
    g.add_argument("--val-fraction", type=float, default=None, help="share of studies held out for validation when --val-truth lists training images (default 0.1)")
    g.add_argument("--val-findings", default=None, help="comma-separated truth columns to evaluate (default: every 0/1 column)")
    g.add_argument("--val-max", type=int, default=None, help="at most this many validation images (default 1000)")
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--init", default=None, metavar="CK", help="fine-tune from this CheXzero checkpoint ('demo': the bundled demo model)")
    src.add_argument("--from-scratch", action="store_true", help="random initialisation (the default without --init)")
    m.add_argument("--arch", choices=list(ARCHS), default=None, help="architecture preset for --from-scratch (default small)")
    for k in DIM_KEYS:
        m.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override the preset's {k}")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    o.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 from scratch, 1e-5 with --init)")
    o.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.1)")
    o.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default min(500, steps/10))")
    o.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor as a fraction of --lr (default 0)")
    o.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default off)")
    o.add_argument("--same-text-positives", action="store_true", default=None, help="identical impressions in a batch count as positives")
    o.add_argument("--augment", action="store_true", default=None, help="light affine / brightness / contrast augmentation")
    o.add_argument("--sentence-sampling", action="store_true", default=None,
                   help="pair each image, at each step, with a random non-empty subset of its impression's sentences "
                        "(each kept with probability 1/2) instead of the whole impression")
    o.add_argument("--query-style", type=float, default=None, metavar="P",
                   help="with probability P per text and step, drop its sentences' closing full stops, so that text "
                        "typed like a search query ('moderate pulmonary edema') is trained on as well (default 0)")
    o.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=None, help="validation AUC every N steps (default: at the end only)")
    r.add_argument("--log-every", type=int, default=None, help="log the loss every N steps (default 10)")
    r.add_argument("--save-every", type=int, default=None, help="write checkpoint and state every N steps (default 500)")
    r.add_argument("--stop-at", type=int, default=None, help="stop at this step (state saved; continue with --resume)")
    r.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time (state saved)")
    r.add_argument("--resume", action="store_true", help="continue from OUT.train-state with its saved config")
    r.add_argument("--overwrite", action="store_true", help="start over even if OUT.train-state exists")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--workers", type=int, default=None, help="decode processes (default --threads)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    r.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="fp32 on CUDA too")
    r.add_argument("--no-cache", dest="cache_to_disk", action="store_false", default=None, help="keep decoded canvases in memory only")
    r.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_cli_train)
    return p


def _cli_train(args: argparse.Namespace) -> int:
    from curator.train import cli_train

    return cli_train(args)
