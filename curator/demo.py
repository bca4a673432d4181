"""``curator demo``: the whole product on a synthetic archive with known answers.

Generates (or reuses) a hospital-like synthetic DICOM archive, embeds it with the bundled demo
model, labels it with the demo prompt set, builds the index, prints "all edema cases" with their
precision and recall against the synthetic ground truth, runs a text search, and starts the app
on localhost (``--no-app`` stops after the pipeline).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_STUDIES = 1500
DEFAULT_SEED = 7  # not the training archive's seed (101) nor the threshold archive's (303)
SEARCH_EXAMPLE = "moderate pulmonary edema"


def data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "curator" / "demo"


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on a synthetic archive, then start the app",
        description="Generate a synthetic DICOM archive with known findings (reused on a second run), embed it with the "
                    "bundled demo model, label, index, print all edema cases with precision and recall against the ground "
                    "truth and a text-search example, then start the app on localhost.",
    )
    p.add_argument("--workspace", "-w", default=None, help=f"workspace folder (default {data_home() / 'workspace'})")
    p.add_argument("--no-app", action="store_true", help="stop after the pipeline instead of starting the app")
    p.add_argument("--studies", type=int, default=DEFAULT_STUDIES, help=f"studies in the synthetic archive (default {DEFAULT_STUDIES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"archive seed (default {DEFAULT_SEED})")
    p.add_argument("--image-size", type=int, default=1024, help="image size of the synthetic archive (default 1024)")
    p.add_argument("--archive", default=None, help="where to write the archive (default: next to the default workspace)")
    p.add_argument("--checkpoint", default="demo", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=8501, help="app port (default 8501)")
    p.add_argument("--workers", type=int, default=None, help="decode/render worker processes (default: one per core)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import pandas as pd

    from curator.cli import resolve_checkpoint_arg
    from curator.demo_model import demo_card, demo_prompts_path
    from curator.index import build_index
    from curator.pipelines.embed import EmbedConfig, run_embed
    from curator.pipelines.label import run_label
    from curator.prompts import load_prompt_set
    from curator.query import run_query
    from curator.constants import NEGATIVE_TEMPLATE
    from curator.search import index_checkpoint, query_vector, search
    from curator.workspace import Workspace

    quiet = getattr(args, "quiet", False)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    home = data_home()
    workspace = Path(args.workspace).expanduser() if args.workspace else home / "workspace"
    archive = Path(args.archive).expanduser() if args.archive else workspace.parent / f"archive-s{args.seed}-n{args.studies}-px{args.image_size}"
    checkpoint = resolve_checkpoint_arg(args.checkpoint)

    # 1. the archive
    truth_csv = archive / "ground_truth.csv"
    if truth_csv.is_file():
        print(f"[1/5] reusing the synthetic archive {archive}")
    else:
        from curator.synth import generate_archive

        print(f"[1/5] generating a synthetic archive of {args.studies} studies in {archive} ...", flush=True)
        s = generate_archive(archive, studies=args.studies, seed=args.seed, image_size=args.image_size,
                             progress=not quiet, workers=max(1, workers), exist_ok=True)
        print(f"      {s['images']} radiographs, plus CT slices, an SR report, a DICOMDIR and broken files")

    # 2. embed
    print(f"[2/5] embedding with the demo model into {workspace} ...", flush=True)
    summary = run_embed(EmbedConfig(archives=[str(archive)], workspace=str(workspace), checkpoints=[checkpoint],
                                    workers=workers, progress=not quiet))
    for line in summary.lines():
        print("      " + line)

    # 3. label with the demo prompt set (columns replace the CheXpert ones of the same name)
    prompts = load_prompt_set(demo_prompts_path())
    print(f"[3/5] labelling with prompt set {prompts.name!r} ({', '.join(prompts.columns)}) from stored embeddings ...", flush=True)
    run_label(str(workspace), prompts, progress=not quiet)

    # 4. index
    ws = Workspace(workspace)
    with ws.writer():
        info = build_index(ws)
    print(f"[4/5] indexed {info.count} images")

    # 5. all edema cases, checked against the ground truth
    card = demo_card()
    threshold = float(card.get("thresholds", {}).get("edema", 0.5))
    truth = pd.read_csv(truth_csv)
    truth["path"] = [str((archive / p).resolve()) for p in truth.path]
    images = run_query(ws, "SELECT path, edema FROM images")
    merged = images.merge(truth[["path", "edema"]].rename(columns={"edema": "truth"}), on="path", how="inner")
    found = merged[merged.edema >= threshold]
    tp = int(found.truth.sum())
    positives = int(merged.truth.sum())
    precision = tp / len(found) if len(found) else float("nan")
    recall = tp / positives if positives else float("nan")
    print(f"[5/5] all edema cases (edema >= {threshold:.4f}): {len(found)} images")
    print(f"      precision {precision:.3f} ({tp} of {len(found)} have edema in the ground truth), "
          f"recall {recall:.3f} ({tp} of {positives} edema images found)")
    print(f"      the same in SQL: curator sql --workspace {workspace} \"SELECT path, edema FROM images WHERE edema >= {threshold!r} ORDER BY edema DESC\"")

    ck = index_checkpoint(ws)
    hits = search(ws, query_vector(ck, text=SEARCH_EXAMPLE), k=10, text=True)
    hits = hits.merge(truth[["path", "edema"]].rename(columns={"edema": "truth_edema"}), on="path", how="left")
    print(f"      text search {SEARCH_EXAMPLE!r}, top {len(hits)} by CLIP similarity")
    print(f"      (curator search --workspace {workspace} {SEARCH_EXAMPLE!r}; --contrast ranks it against "
          f"{NEGATIVE_TEMPLATE.format(SEARCH_EXAMPLE)!r}):")
    for r in hits.itertuples():
        mark = "edema" if r.truth_edema == 1 else "no edema"
        print(f"        {r.rank:2d}. {r.similarity:.3f}  {Path(r.path).relative_to(archive.resolve())}  (truth: {mark})")
    if args.no_app:
        return 0
    from curator.appserver import cmd_app

    print("starting the app; Ctrl+C stops it", flush=True)
    return cmd_app(argparse.Namespace(workspace=str(workspace), port=args.port, host="127.0.0.1", device=None, exports=None))
