"""The ``curator`` command line: a thin layer over the library and the pipelines."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

# torch's OpenMP threads must not spin while the decode workers need the cores (an idle model
# thread spinning at a barrier starved the readers: 3x slower with one worker). Set before torch
# is imported; a value from the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from curator import __version__
from curator import constants as C

log = logging.getLogger("curator")

EPILOG = """\
typical session:
  curator embed /data/cxr --workspace ws --checkpoint chexzero_1.pt --checkpoint chexzero_2.pt
  curator index --workspace ws
  curator search --workspace ws "small left pleural effusion" -k 20
  curator sql --workspace ws "SELECT path, edema FROM images ORDER BY edema DESC LIMIT 10"
  curator label --workspace ws --prompts my_findings.toml
"""


# Modules that register further subcommands with ``add_cli(subparsers)``. Each keeps heavy
# imports (torch, streamlit, ...) inside its handlers so that ``curator --help`` stays fast.
EXTRA_COMMAND_MODULES = (
    "curator.train_cli",
    "curator.demo",
    "curator.appserver",
    "curator.cohort",
    "curator.evaluate",
    "curator.calibrate",
    "curator.prompt_compare",
    "curator.bench",
)


class CliError(Exception):
    """An error to print as one line, exit status 2."""


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", required=True, metavar="W", help="workspace folder (created by `curator embed`)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device: cuda, cuda:1, cpu (default: CUDA when available, else CPU)")


def _modalities(value: str):
    if value.strip().lower() in ("any", "all", "*"):
        return None
    mods = frozenset(v.strip().upper() for v in value.split(",") if v.strip())
    if not mods:
        raise argparse.ArgumentTypeError("give modalities such as CR,DX or 'any'")
    return mods


def _similarity(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a similarity from -1 to 1, got {value!r}") from None
    if not -1.0 <= x <= 1.0:  # (nan fails too)
        raise argparse.ArgumentTypeError(f"expected a similarity from -1 to 1, got {value}")
    return x


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _share(value: str) -> float | str:
    """'auto', or a fraction from 0 to 1."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number from 0 to 1, got {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number from 0 to 1, got {x}")
    return x


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return x


def _nonneg_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def _memory_size(value: str) -> str:
    import re

    v = value.strip()
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", v, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size such as 512MB or 2GB, got {value!r}")
    return v


def resolve_checkpoint_arg(value: str) -> str:
    """``demo`` names the bundled demo model; anything else is a path."""
    if value == "demo":
        from curator.demo_model import demo_checkpoint_path

        return str(demo_checkpoint_path())
    return value


# ------------------------------------------------------------------------------------------
def cmd_embed(args) -> int:
    from curator.pipelines.embed import EmbedConfig, run_embed
    from curator.readers import ReadOptions

    odd = sorted((args.modality or frozenset()) - C.DICOM_MODALITIES)
    if odd:
        log.warning("--modality %s: not a DICOM modality code (radiographs are CR and DX; 'any' takes every modality); "
                    "only DICOM files whose Modality is exactly that pass", ",".join(odd))
    cfg = EmbedConfig(
        archives=args.archive,
        workspace=args.workspace,
        checkpoints=[resolve_checkpoint_arg(c) for c in args.checkpoint],
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        read_options=ReadOptions(dicom_conversion=args.dicom_conversion, modalities=args.modality,
                                 jpeg_draft_min_side=C.CANVAS_SIZE if args.fast_jpeg else None, jpeg_on_device=args.gpu_jpeg,
                                 letterbox_on_device=args.gpu_letterbox),
        flush_rows=args.flush_rows,
        progress=not args.quiet,
        engine=args.engine,
        ray_address=args.address,
        prune=args.prune or args.prune_force,
        prune_force=args.prune_force,
        retry_errors=args.retry_errors,
        worker_jpeg_share=args.worker_jpeg_share, amp=args.amp,
    )
    if args.address and args.engine != "ray":
        raise CliError("--address is for --engine ray")
    if args.workers is not None and args.engine == "ray":
        raise CliError("--workers is for --engine local: with --engine ray a decode task runs on each CPU the cluster offers")
    if args.worker_jpeg_share is not None and not args.gpu_jpeg:
        raise CliError("--worker-jpeg-share is the reader workers' share of --gpu-jpeg's JPEGs: add --gpu-jpeg, or leave it out")
    if args.worker_jpeg_share == "auto" and args.engine == "ray":
        raise CliError("--worker-jpeg-share auto adapts only with --engine local; with --engine ray give a number from 0 to 1 "
                       "(default 0: every grayscale JPEG is decoded by a model actor, on its GPU)")
    summary = run_embed(cfg)
    for line in summary.lines():
        print(line)
    return 0


def cmd_label(args) -> int:
    from curator.pipelines.label import run_label, workspace_checkpoints
    from curator.prompts import load_prompt_set
    from curator.workspace import Workspace

    prompts = load_prompt_set(args.prompts)
    cks = None
    if args.checkpoint:
        cks = workspace_checkpoints(Workspace(args.workspace), args.device, [resolve_checkpoint_arg(c) for c in args.checkpoint])
    s = run_label(args.workspace, prompts, device=args.device, checkpoints=cks, progress=not args.quiet)
    print(f"labelled {s.images} images with prompt set {prompts.name} ({s.prompt_set}) in {s.seconds:.1f} s")
    print("columns: " + ", ".join(s.columns))
    return 0


def cmd_index(args) -> int:
    from curator.index import build_index
    from curator.workspace import Workspace

    ws = Workspace(args.workspace)
    _require_workspace(ws)
    with ws.writer():
        info = build_index(ws, args.checkpoint, budget_gb=args.budget_gb, kind=args.type, recall_sample=args.recall_sample,
                           refine=not args.no_refine)
    budget = f"{info.budget_gb:g} GB budget" if info.budget_gb is not None else "default budget (half the memory)"
    from curator.index import _gb

    print(f"chose {info.index_type} ({info.description}, index ~{_gb(info.est_gb)}; {budget}): {info.reason}")
    if info.recall_at_10 is not None:
        probe = f", nprobe {info.nprobe} of {info.nlist} lists" if info.nlist else ""
        rerank = ", re-ranked from float16 copies" if info.refine_files else ""
        print(f"recall@10 {info.recall_at_10:.3f} against exact search on {info.recall_queries} held-out image queries{probe}{rerank}")
    if info.recall_at_10_text is not None:
        probe = f", nprobe {info.nprobe_text} of {info.nlist} lists for text searches" if info.nlist and info.nprobe_text else ""
        print(f"recall@10 {info.recall_at_10_text:.3f} on {info.recall_queries_text} held-out text queries (prompt-set findings and "
              f"common search phrases, plain and contrasted with 'no ...'){probe}")
    gpu = f" (k-means and assignment on the GPU via {info.gpu})" if info.gpu else ""
    print(f"indexed {info.count} images ({info.dim}-d, {info.index_type}, checkpoint {info.checkpoint[:12]}) in {info.build_s:.1f} s{gpu} -> {ws.root / info.file}")
    return 0


def cmd_search(args) -> int:
    from curator.readers import ReadError
    from curator.search import above, index_checkpoint, query_read_options, query_vector, search
    from curator.workspace import Workspace

    ws = Workspace(args.workspace)
    _require_workspace(ws)
    text, contrast = args.text, args.contrast
    if text is None and args.image is None and contrast is not None and "{}" not in contrast:
        # `--contrast "moderate pulmonary edema"`: the flag took the search text as its TEMPLATE
        # (a template always has a {}); the user meant the text with the default contrast.
        text, contrast = contrast, C.NEGATIVE_TEMPLATE
    if (text is None) == (args.image is None):
        raise CliError("give a search TEXT or --image PATH (one of them)")
    if contrast is not None and args.image is not None:
        raise CliError("--contrast applies to a text search, not to --image")
    if args.above is not None and args.k is not None:
        raise CliError("-k and --above are two ways of saying how many: give one (--above returns every image above the similarity)")
    if args.image is not None and not os.path.lexists(args.image):
        raise CliError(f"{args.image}: no such file")
    if args.image is not None and os.path.isfile(args.image):
        from curator.search import query_modality_note

        with open(args.image, "rb") as f:
            note = query_modality_note(ws, f.read(1 << 16))
        if note:
            log.warning("%s", note)
    ck = index_checkpoint(ws, args.device, [resolve_checkpoint_arg(c) for c in args.checkpoint] if args.checkpoint else None)
    try:
        vec = query_vector(ck, text=text, image=args.image, contrast=contrast, read_options=query_read_options(ws))
    except ReadError as exc:
        raise CliError(f"{args.image}: {exc}") from exc  # (-vv shows the reader's traceback)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.above is not None:
        df = above(ws, vec, args.above)
    else:
        df = search(ws, vec, k=args.k or 20, text=text is not None)
    finding_cols = sorted(ws.manifest.get("finding_columns", {}))
    if args.json:
        keep = ["rank", "image_id", "similarity", "path", "view_position", "study_date", *finding_cols]
        records = json.loads(printable_frame(df[[c for c in keep if c in df.columns]]).to_json(orient="records", date_format="iso"))
        print(json.dumps({"query": text or str(args.image), "contrast": contrast, **({"above": args.above} if args.above is not None else
                          {"k": args.k or 20}), "results": records}, default=str, indent=1))
        return 0
    if df.empty:
        print("no results")
        return 0
    show = df[["rank", "similarity", "path", *[c for c in finding_cols if c in df.columns]]].copy()
    show["path"] = [shown_path(p) for p in show["path"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.4f}", max_colwidth=80))
    return 0


def shown_path(path, width: int = 80) -> str:
    """A path cut to ``width`` characters on the left: its end (the file's name) is what tells
    results apart."""
    text = str(path)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def cmd_sql(args) -> int:
    from curator.query import run_query
    from curator.workspace import Workspace

    ws = Workspace(args.workspace)
    _require_workspace(ws)
    params = {}
    for item in args.set or []:
        if "=" not in item:
            raise CliError(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        params[name.strip()] = _parse_value(value)
    query = _query_text(args.query)
    refusal = _read_only_refusal(query)
    if refusal:
        raise CliError(refusal)  # e.g. "Only read-only queries (SELECT) can run here, not COPY."
    df = run_query(ws, query, params)
    if args.format == "csv":
        printable_frame(df, lists_as_json_text=True).to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(printable_frame(df).to_json(orient="records", date_format="iso", default_handler=str))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.width", 200, "display.max_columns", 50):
            print(df.to_string(index=False, max_rows=args.max_rows, max_colwidth=60) if len(df) else f"(0 rows) columns: {', '.join(df.columns)}")
    return 0


def _read_only_refusal(query: str) -> str | None:
    """Why ``query`` may not run (curator sql is read-only, as the app's SQL page); None if it may."""
    import duckdb

    from curator.query import read_only_refusal

    con = duckdb.connect(":memory:")  # only parses the text
    try:
        return read_only_refusal(con, query)
    finally:
        con.close()


def shipped_sql_files() -> list[str]:
    """The query files shipped with curator (``sql/`` in the source tree), e.g. ``cohorts/edema.sql``."""
    from importlib import resources

    found: list[str] = []

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".sql") and f"{prefix}{entry.name}" != "views.sql":  # views.sql: the views, not a query
                found.append(f"{prefix}{entry.name}")

    walk(resources.files("curator.sql"), "")
    return sorted(found)


def _query_text(arg: str) -> str:
    """The SQL of ``curator sql``'s QUERY argument: SQL text, ``-`` (standard input), or a .sql file.

    A .sql path that is no file here names one of the files shipped with curator when it ends
    like one: ``sql/cohorts/edema.sql`` (the source tree's path) or ``cohorts/edema.sql`` works
    from any folder.
    """
    if arg == "-":
        return sys.stdin.read()
    if not arg.endswith(".sql"):
        return arg
    path = Path(arg)
    if path.is_file():
        return path.read_text()
    if any(ch.isspace() for ch in arg):  # SQL text that happens to end in ".sql" (a column named sql)
        return arg
    parts = [p for p in arg.replace("\\", "/").split("/") if p not in ("", ".")]
    shipped = shipped_sql_files()
    # the path after its last `sql` folder (sql/cohorts/edema.sql -> cohorts/edema.sql), else all of it
    after = max((i + 1 for i, part in enumerate(parts[:-1]) if part == "sql"), default=0)
    tail = "/".join(parts[after:])
    if tail in shipped:  # (a listed name: no "..")
        from curator.query import sql_text

        return sql_text(tail)
    raise CliError(f"{arg}: no such file (the SQL files shipped with curator: {', '.join(shipped) or 'none'})")


_INT_RE = r"[-+]?\d+"
_FLOAT_RE = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"


def _parse_value(v: str):
    """A --set VALUE: a number (42, 0.52, 1e-3) becomes a number; anything else, a number written
    with a leading zero (an identifier such as 007) and a value in single quotes ('42') stays text."""
    import re

    if len(v) >= 2 and v[0] == v[-1] == "'":
        return v[1:-1]
    digits = v.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
        return v
    if re.fullmatch(_INT_RE, v):
        return int(v)
    if re.fullmatch(_FLOAT_RE, v):
        return float(v)
    return v


def printable_frame(df, lists_as_json_text: bool = False):
    """A copy of a query result ready for JSON or CSV output.

    DATE columns come out as ``2024-10-07`` (pandas holds DuckDB's DATE as a datetime at midnight;
    like pandas' own CSV and table output, a datetime column whose every value is at midnight is
    taken for dates). List and struct values become plain lists and dicts (float32 values with
    their shortest digits), with ``lists_as_json_text`` JSON text such as ``[-0.128, -0.156]`` for
    CSV, where numpy would write ``[-0.128 -0.156]``.
    """
    import numpy as np
    import pandas as pd

    out = df.copy()
    for i in range(out.shape[1]):
        s = out.iloc[:, i]
        if pd.api.types.is_datetime64_dtype(s.dtype):
            present = s.dropna()
            if (present == present.dt.normalize()).all():
                out.isetitem(i, s.dt.strftime("%Y-%m-%d").astype(object).where(s.notna(), None))
        elif s.dtype == object and s.map(lambda v: isinstance(v, (np.ndarray, list, tuple, dict))).any():
            values = s.map(_plain_value)
            if lists_as_json_text:
                values = values.map(lambda v: json.dumps(v, default=str) if isinstance(v, (list, dict)) else v)
            out.isetitem(i, values)
    return out


def _plain_value(v):
    """A value of a list/struct column as plain JSON-able Python (see :func:`printable_frame`)."""
    import datetime as dt

    import numpy as np
    import pandas as pd

    if isinstance(v, np.ndarray) or isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain_value(x) for k, x in v.items()}
    if isinstance(v, (np.floating, float)):
        if v != v:  # NaN
            return None
        return float(str(v)) if isinstance(v, np.float32) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (np.datetime64, dt.datetime)):
        t = pd.Timestamp(v)
        if t is pd.NaT:
            return None
        return t.date().isoformat() if t == t.normalize() and t.tzinfo is None else t.isoformat()
    if isinstance(v, dt.date):
        return v.isoformat()
    return v


def cmd_info(args) -> int:
    from curator.info import workspace_info

    info = workspace_info(args.workspace)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        from curator.info import format_info

        print(format_info(info))
    return 0


def cmd_cache(args) -> int:
    from curator import query_cache
    from curator.workspace import open_workspace

    ws = open_workspace(args.workspace)
    if args.status:
        print(query_cache.describe(query_cache.status(ws)))
        return 0
    with ws.writer():
        if args.off:
            had = query_cache.drop(ws)
            ws.commit(query_cache="off")
            print(("removed " + str(query_cache.cache_path(ws)) if had else "no query cache to remove")
                  + "; embed and label will not build one (`curator cache` turns it back on)")
            return 0
        st = query_cache.refresh(ws, force=args.rebuild, memory_limit=args.memory)
        if query_cache.mode(ws) != "on":
            ws.commit(query_cache="on")
    print(query_cache.describe(st))
    return 0


def cmd_preview(args) -> int:
    from curator.preview import write_preview
    from curator.readers import ReadError, ReadOptions

    if not os.path.lexists(args.file):
        raise CliError(f"{args.file}: no such file")
    opts = ReadOptions(dicom_conversion=args.dicom_conversion, modalities=None)
    try:
        info = write_preview(args.file, args.out, args.model_input, opts)
    except ReadError as exc:
        raise CliError(f"{args.file}: {exc}") from exc  # (-vv shows the reader's traceback)
    print(f"{args.file}: {info['width']}x{info['height']} 8-bit ({info['conversion']}) -> {args.out}")
    if args.model_input:
        print(f"model input 224x224 -> {args.model_input}")
    return 0


def cmd_synth(args) -> int:
    from curator.synth import generate_archive

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.exist_ok:
        raise CliError(f"{out}: exists and is not empty (choose a new folder, or --exist-ok to write into this one)")
    s = generate_archive(Path(args.out), studies=args.studies, seed=args.seed, fmt=args.format, image_size=args.image_size,
                         broken=not args.no_broken, progress=not args.quiet, workers=args.workers, exist_ok=args.exist_ok)
    print(f"wrote {s['images']} images of {s['studies']} studies ({s['patients']} patients) to {args.out} "
          f"in {s['seconds']:.1f} s; plus {len(s['non_cxr']) if isinstance(s['non_cxr'], list) else s['non_cxr']} non-CXR "
          f"and {len(s['broken']) if isinstance(s['broken'], list) else s['broken']} broken files")
    print("positives: " + ", ".join(f"{k} {v}" for k, v in s["positives"].items()))
    print(f"ground truth: {Path(args.out) / 'ground_truth.csv'}; reports: {Path(args.out) / 'reports.csv'}")
    return 0


def cmd_verify(args) -> int:
    from curator.verify import verify

    rep = verify(args.workspace, repair=args.repair)
    for line in rep.lines():
        print(line)
    return 0 if rep.ok else 1


def _require_workspace(ws) -> None:
    from curator.workspace import open_workspace

    open_workspace(ws)


# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curator",
        description="CheXzero zero-shot labelling, search and cohorts over chest radiograph archives.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"curator {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("embed", help="embed an archive into a workspace (catalog, embeddings, probabilities)",
                       description="Walk ARCHIVE folders (DICOM, PNG, JPEG), embed every new or changed image with each "
                       "checkpoint and store catalog, embeddings, zero-shot probabilities of the default prompt set (CheXpert's 14 "
                       "findings) and errors in the workspace. Unchanged files (same size and mtime) are skipped, so a rerun "
                       "continues where a killed run stopped.")
    p.add_argument("archive", nargs="+", help="folders or files to embed")
    _add_workspace(p)
    p.add_argument("--checkpoint", "-c", action="append", required=True, metavar="CK",
                   help="CheXzero checkpoint (.pt state dict); repeat for an ensemble; 'demo' = the bundled demo model")
    p.add_argument("--device", default=None,
                   help="where the models run, one replica per device: cuda = every visible GPU (the default when there is one), "
                   "cuda:1 = that GPU, cuda:0,cuda:2 = those GPUs, cpu (the default without a GPU); --batch-size is split "
                   "across the replicas")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per model batch (default 32)")
    p.add_argument("--workers", type=_nonneg_int, default=None, help="decode worker processes (default: one per CPU core, at most 8 unless the model runs on a CUDA GPU; 0 = decode in the main process)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads in the main process (default: torch's)")
    p.add_argument("--dicom-conversion", choices=["mimic", "voi"], default="mimic",
                   help="DICOM to 8-bit: 'mimic' = MIMIC-CXR-JPG recipe, what CheXzero was trained on (default); 'voi' = VOI LUT / window")
    p.add_argument("--modality", type=_modalities, default=C.DEFAULT_MODALITIES,
                   help="DICOM modalities to accept, comma-separated, or 'any' (default CR,DX); others are recorded as filtered")
    p.add_argument("--flush-rows", type=_positive_int, default=4096, help="commit to the workspace every N files (default 4096)")
    p.add_argument("--fast-jpeg", action="store_true",
                   help="decode JPEG files and JPEG baseline DICOMs at 1/2, 1/4 or 1/8 scale in the DCT domain, and JPEG 2000 "
                   "DICOMs from a lower resolution level of the codestream (both sides stay >= 320 px): several times faster on "
                   "full-size films (JPEG 2000 about 10x), but not CheXzero-exact (probabilities move slightly; see "
                   "benchmarks/README.md). Rows read this way have conversion 'raster+dct/N', 'mimic+dct/N' or 'mimic+j2k/N' in "
                   "the catalog. With --gpu-jpeg, the GPU decodes its JPEGs in full and this applies to what the CPU reads (the reader "
                   "workers' share, other formats). Default: exact decode")
    p.add_argument("--gpu-jpeg", action="store_true",
                   help="decode grayscale JPEG files on the model's GPU (nvJPEG, through torchvision) and letterbox them there, "
                   "instead of in the reader workers: on a GPU node the CPU cores decoding full-size films are the limit. The "
                   "resize repeats Pillow's Lanczos arithmetic exactly, so the 320x320 canvas equals the exact path's wherever "
                   "the decoder returns libjpeg-turbo's pixels (nvJPEG may differ by a grey level; see benchmarks/README.md). "
                   "Colour JPEGs, PNGs and DICOMs are read as usual; a JPEG the GPU decoder rejects is read on the CPU. Rows "
                   "decoded this way have conversion 'raster+cuda-jpeg' ('raster+cpu-jpeg' without a GPU, where it is slower "
                   "than the default). Meant for data-centre GPUs (fast float64). A file that crashes the GPU "
                   "decoder ends the run (the reader workers would record it and go on); rerun, and the files that were being "
                   "decoded are read by the workers. With --engine ray each model actor decodes on its own GPU (so every GPU of a "
                   "node decodes); a batch whose decode kills an actor is read on the CPU when Ray retries it, in the same run. "
                   "With --fast-jpeg, the JPEGs the CPU reads (see --worker-jpeg-share) are decoded in the DCT domain, which "
                   "makes the workers' share faster; the GPU's stay exact")
    p.add_argument("--worker-jpeg-share", type=_share, default=None, metavar="auto|F",
                   help="with --gpu-jpeg: the share of grayscale JPEGs the reader workers decode themselves, the exact way (in the DCT "
                   "domain with --fast-jpeg), beside the GPU's decoder (their rows keep conversion 'raster', or 'raster+dct/N'). 'auto' adapts it after every model batch so that "
                   "neither waits for the other (on a GPU node the workers are otherwise mostly idle); a number from 0 to 1 fixes "
                   "it (0: every one on the GPU). With auto, which files each side decodes depends on timing: fix a number "
                   "for runs that must repeat to the bit (nvJPEG may differ from libjpeg-turbo by a grey level; with --fast-jpeg the "
                   "workers' files are decoded reduced, the GPU's in full). Default: auto "
                   "on a GPU, 0 on the CPU and with --engine ray (which takes a number only: its decode tasks are spread over the "
                   "cluster)")
    p.add_argument("--gpu-letterbox", action="store_true",
                   help="letterbox and transform grayscale images on the model's GPU instead of in the reader workers, which then "
                   "only decode and convert: on a GPU node the workers are the limit, and the Lanczos resize of a full-size film "
                   "costs them about as much as decoding it. Exact: the resize repeats Pillow's arithmetic to the bit, so the "
                   "canvases are the default path's and rows keep their usual conversion (on a GPU the normalisation and the 224 "
                   "resize then run there too, equal within float rounding). Any format (DICOM, PNG, JPEG); colour images are "
                   "letterboxed by the workers as usual. The workers hand full-size images over through shared memory (/dev/shm: "
                   "5-10 MB per film in flight; a container needs room there) and a model batch of them is held in pinned memory "
                   "(two on a GPU, where the next batch's letterbox runs beside the model). "
                   "Works beside --gpu-jpeg and --fast-jpeg, and with --engine ray (each model actor letterboxes its batches on its "
                   "GPU; the decode tasks send the decoded images through Ray's object store)")
    p.add_argument("--amp", action="store_true",
                   help="run the model in fp16 autocast on a CUDA GPU: faster, but not CheXzero-exact (the probabilities move "
                   "by up to ~5e-5). Default: float32 on every device, with TF32 off, as CheXzero's own code runs it")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="'local': decode worker processes + models on this machine (default); 'ray': the same stages on Ray Data "
                   "(decode tasks on the cluster's CPUs, one model actor per GPU), needs pip install 'curator-cxr[ray]'")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster to join: HEAD:6379 (the head node's address), 'auto' (the cluster "
                   "`ray start` runs on this machine) or ray://HEAD:10001 (Ray Client, needs pip install 'ray[client]'); default: "
                   "RAY_ADDRESS if set, else start a local one. Archive and checkpoints must be at the same paths on every node")
    p.add_argument("--prune", action="store_true",
                   help="retire the rows of catalogued files under the ARCHIVE folders that are no longer there (deleted or "
                   "moved): they leave the catalog, the views and the index, and come back if the file does. Nothing is "
                   "deleted; a file is retired only if it is really not there (lstat). An ARCHIVE folder, or a subfolder directly "
                   "in it holding 20+ catalogued files, with more than half of them gone is left alone (unmounted share?). Failed files "
                   "that are gone leave the errors view too")
    p.add_argument("--prune-force", action="store_true", help="--prune even where more than half of a folder's files are gone")
    p.add_argument("--retry-errors", action="store_true",
                   help="read again every file that failed before, unchanged or not (e.g. after a curator upgrade or a decode "
                   "time-out on a busy machine). Without it, a file that failed is skipped while its size and mtime stay the "
                   "same, except where the reason was the machine's, not the file's (no permission, an I/O error, out of memory): "
                   "those are read again by every run")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("label", help="(re)compute probabilities for a prompt set from stored embeddings",
                       description="Score every embedded image for the findings of a prompt set (TOML) without reading any image. "
                       "Each finding becomes a column of the `images` view, replacing an older column of the same name.")
    _add_workspace(p)
    p.add_argument("--prompts", metavar="FILE", default=None, help="prompt-set TOML file (default: CheXpert's 14 findings)")
    p.add_argument("--checkpoint", "-c", action="append", metavar="CK", help="checkpoint files, if they moved since `embed`")
    _add_device(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("index", help="build the FAISS index for search",
                       description="Build an inner-product FAISS index over one checkpoint's normalised image embeddings (ids = image_id), "
                       "chosen by size and memory budget: exact (flat, fp16, sq8) up to a million images, IVF (ivf-flat, ivf-sq8, ivf-pq) "
                       "beyond, with nprobe tuned to recall@10 >= 0.95. 8-bit and PQ codes (sq8, ivf-sq8, ivf-pq) rank close neighbours "
                       "out of order, so their searches re-rank 4k candidates from float16 copies of the vectors kept on disk next to the "
                       "index (2 bytes a dimension, ~1 GB a million 512-d images, read row by row; not counted in the memory budget). "
                       "Prints the choice and the recall@10 measured against exact search.")
    _add_workspace(p)
    p.add_argument("--checkpoint", default=None, metavar="SHA", help="which of the workspace's checkpoints (sha256 prefix; default: the first)")
    p.add_argument("--budget-gb", type=_positive_float, default=None, metavar="GB", help="memory the index (and its build) may use (default: half the memory)")
    p.add_argument("--type", default="auto", choices=["auto", "flat", "fp16", "sq8", "ivf-flat", "ivf-sq8", "ivf-pq"],
                   help="index type (default auto: chosen by size and budget)")
    p.add_argument("--recall-sample", type=_nonneg_int, default=1000, metavar="Q",
                   help="sample queries to tune nprobe on (half) and measure recall@10 on (the other half); 0 skips (default 1000)")
    p.add_argument("--no-refine", action="store_true",
                   help="no float16 copies for re-ranking: saves their disk space; sq8/ivf-sq8/ivf-pq then rank by their codes alone "
                        "(lower recall@10)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search images by text or by an example image",
                       description="Encode TEXT (or --image) with the index's checkpoint and print the k most similar images with their probabilities.")
    _add_workspace(p)
    p.add_argument("text", nargs="?", default=None, help='free text, e.g. "small left pleural effusion"')
    p.add_argument("-k", type=_positive_int, default=None, help="number of results (default 20)")
    p.add_argument("--above", type=_similarity, default=None, metavar="S",
                   help="instead of the top k: every image whose similarity to the query is above S (-1 to 1), most similar "
                   "first, e.g. a cohort defined by a text query; exact against the index's float16 copies (its stored codes where "
                   "it keeps none: flat types, --no-refine). `curator search` prints similarities for a sense of the scale; with "
                   "--contrast it is the similarity to the difference vector")
    p.add_argument("--image", default=None, metavar="PATH", help="search with this image (DICOM/PNG/JPEG) instead of text")
    p.add_argument("--contrast", nargs="?", const=C.NEGATIVE_TEMPLATE, default=None, metavar="TEMPLATE",
                   help='rank by TEXT against its negation (default template "no {}"): the zero-shot contrast of CheXzero, '
                        "with the query as the finding; the similarity printed is then to the difference vector. A TEMPLATE "
                        "has a {} for the text; a value without one, given with no TEXT (--contrast \"pulmonary edema\"), "
                        "is the TEXT, contrasted with the default template")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--checkpoint", "-c", action="append", metavar="CK", help="checkpoint files, if they moved since `embed`")
    _add_device(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sql", help="run a read-only DuckDB query over the workspace views",
                       description="Views: catalog, embeddings, predictions, errors, runs, images (catalog + one probability column per finding) "
                       "and, once `curator calibrate` has stored thresholds, labels (image_id + a 1/0/-1 <finding>_label column per "
                       "calibrated finding). Read-only, like the app's SQL page: one SELECT (or EXPLAIN [ANALYZE] of one) per call; "
                       "COPY, CREATE, ATTACH, SET and other statements are refused, and so is reading files outside the workspace's "
                       "data folders. DATE values print as YYYY-MM-DD, lists in CSV as JSON lists.")
    _add_workspace(p)
    p.add_argument("query", help="SQL text, a .sql file, or - for standard input; a .sql path that is no file here may name a "
                   "file shipped with curator, e.g. sql/cohorts/edema.sql or cohorts/edema.sql")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="set a variable readable as getvariable('NAME'), e.g. threshold=0.52; numbers become numbers, except "
                   "with a leading zero (pid=007 stays text); single quotes force text (pid=\"'7'\")")
    p.add_argument("--max-rows", type=_positive_int, default=100, help="rows shown in table format (default 100)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("info", help="summarise a workspace")
    _add_workspace(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("cache", help="build (or remove) the query cache that speeds up SQL on large workspaces",
                       description="Materialise the `images` view (catalog + probabilities) in W/cache/images.duckdb, so cohort queries "
                       "on millions of images read DuckDB's own storage instead of joining Parquet parts. The cache is used only while it "
                       "matches the workspace (queries fall back to the Parquet parts otherwise) and `curator embed` / `curator label` "
                       f"rebuild it after each change; workspaces of {1_000_000:,} images or more get it without asking. Deleting it loses nothing.")
    _add_workspace(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", action="store_true", help="only say whether there is a cache and whether it is current")
    g.add_argument("--off", action="store_true", help="remove the cache and stop embed/label from building one")
    g.add_argument("--rebuild", action="store_true", help="rebuild even if the cache is current")
    p.add_argument("--memory", default="1GB", type=_memory_size, metavar="SIZE", help="memory DuckDB may use while building; it spills to disk beyond (default 1GB)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("preview", help="write the 8-bit image the pipeline makes of a file (and the model input)",
                       description="Write FILE converted exactly as the pipeline converts it (before the 320 letterbox), and optionally the 224x224 model input.")
    p.add_argument("file")
    p.add_argument("--out", required=True, metavar="PNG", help="where to write the 8-bit image (a .png file: lossless)")
    p.add_argument("--model-input", metavar="PNG2", default=None, help="also write the model's 224x224 input (de-normalised; a .png file)")
    p.add_argument("--dicom-conversion", choices=["mimic", "voi"], default="mimic")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("synth", help="generate a synthetic chest radiograph archive with known ground truth",
                       description="Write a hospital-like archive (patient/study/series folders, CR and DX, PA/AP/lateral, compressed "
                       "transfer syntaxes, MONOCHROME1, CT slices, an SR, a DICOMDIR and broken files) of phantom radiographs with "
                       "findings, OUT/ground_truth.csv (path + one 0/1 column per finding) and OUT/reports.csv (study_key, report).")
    p.add_argument("out", help="output folder (must be empty or new)")
    p.add_argument("--studies", type=_positive_int, default=100, help="number of studies (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes (default 0)")
    p.add_argument("--format", choices=["dicom", "png"], default="dicom", help="DICOM archive (default) or PNG/JPEG export")
    p.add_argument("--image-size", type=_positive_int, default=1024, help="longer side of the images in pixels (default 1024)")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes rendering images (default 1)")
    p.add_argument("--no-broken", action="store_true", help="leave out broken and non-CXR files")
    p.add_argument("--exist-ok", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("verify", help="check a workspace's invariants (and repair what can be repaired)",
                       description="Check that every listed part exists, no orphan or temporary file is left, every image has exactly one "
                       "embedding per checkpoint and one prediction row per member, and the index matches the catalog. Exit 0 when all hold.")
    _add_workspace(p)
    p.add_argument("--repair", action="store_true", help="remove orphan/temporary files and rebuild a stale index")
    p.set_defaults(func=cmd_verify)

    for module in EXTRA_COMMAND_MODULES:
        try:
            mod = __import__(module, fromlist=["add_cli"])
        except ImportError as exc:
            if getattr(exc, "name", None) == module:
                continue
            raise
        if hasattr(mod, "add_cli"):
            mod.add_cli(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    # curator's own messages at the chosen level; the libraries' only from warnings up (their INFO
    # lines, e.g. OpenJPEG's "tile number 1 / 1" per encoded file, mean nothing to a user), all with -vv
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("curator").setLevel(level)
    for noisy in ("PIL", "pydicom", "matplotlib", "urllib3", "faiss", "faiss.loader", "openjpeg"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # pydicom logs each decoder plugin that fails on a file as an ERROR with a traceback, although
    # the next plugin may decode it, and a file none decodes is recorded with its reason: a broken
    # archive would flood the terminal with what looks like crashes. Shown with -vv.
    logging.getLogger("pydicom.pixels").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from curator.prompts import PromptSetError
    from curator.query import QueryError
    from curator.readers import ReadError
    from curator.workspace import WorkspaceError

    def fail(exc: BaseException, text: str, code: int) -> int:
        if args.verbose > 1:  # -vv: the traceback too
            log.debug("traceback of the error below", exc_info=exc)
        print(f"curator {args.command}: error: {text}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # (an OSError: before the OSError clause)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # (curator.model.CheckpointError is a ValueError: caught here without importing torch)
    except (CliError, PromptSetError, QueryError, WorkspaceError, ReadError, ValueError) as exc:
        return fail(exc, str(exc), 2)
    except OSError as exc:  # FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ...
        return fail(exc, os_error_text(exc), 2)
    except RuntimeError as exc:
        return fail(exc, str(exc), 1)
    except KeyboardInterrupt:
        print(f"curator {args.command}: interrupted; committed work is kept, rerun to continue", file=sys.stderr)
        return 130
    except SystemExit as exc:  # Ray's SIGTERM handler (installed by ray.init) exits with the signal's number
        if exc.code != signal.SIGTERM:
            raise
        print(f"curator {args.command}: stopped by SIGTERM; committed work is kept, rerun to continue", file=sys.stderr)
        return 128 + signal.SIGTERM


def os_error_text(exc: OSError) -> str:
    """One line for an OSError, with the path it is about: ``ws: exists and is not a folder``."""
    if exc.filename is None:
        return str(exc)
    name = os.fsdecode(exc.filename)
    what = exc.strerror or str(exc)
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and os.path.exists(name) and not os.path.isdir(name):
        what = "exists and is not a folder"
    text = f"{name}: {what}"
    if exc.filename2 is not None:
        text += f" (and {os.fsdecode(exc.filename2)})"
    return text


if __name__ == "__main__":
    sys.exit(main())
