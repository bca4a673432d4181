"""Rerun of `curator embed` over an unchanged archive of N files: how long until it has decided
that there is nothing to do.

THE FIRST RUN IS SIMULATED. The script writes N tiny valid PNG files (16x16, 8-bit grey) in
nested MIMIC-like folders (ARCHIVE/p10/p10000032/s50000123/<k>.png), then creates a workspace
whose catalog already holds every one of them, exactly as `curator embed` would have left it:
the real path (os.walk of the resolved archive), size and mtime_ns from os.stat, the blake2b
content hash of the bytes, file_format png, conversion raster, 16x16; parts of --part-rows rows
(embed's default --flush-rows, 4096) each with an embeddings part (random unit vectors) and a
predictions part (default prompt set, checkpoint + ensemble member), written through the
Workspace API (write_part + commit) with the checkpoint registered as embed registers it (a tiny
CLIP saved with torch.save; sha256, path, embed_dim, ensemble, default prompt set). Embedding
100k images for real would take hours on this 2-core machine; the rerun only compares
(path, size, mtime_ns) with the catalog, which this reproduces.

Then, as subprocesses under /usr/bin/time -v (wall time, peak RSS):

  rerun      `python -m curator.cli -q embed ARCHIVE --workspace W --checkpoint CK --device cpu`,
             --repeats times (median reported); each must report 0 embedded and N skipped as
             unchanged (its printed summary and its row in W/runs/ both checked).
             Target (issue 6): < 60 s at 100k files.
  +new       --new more PNG files are added and the same command runs once: exactly --new must
             be embedded (really, through the tiny checkpoint) and N skipped.

and, in this process, the two parts of a rerun that grow with N: walking the archive
(curator.discover.walk) and reading the catalog into the skip table (pipelines.embed.known_files).

    nice -n 19 python benchmarks/rerun_unchanged.py --files 100000
    nice -n 19 python benchmarks/rerun_unchanged.py --files 20000 --repeats 1 --keep /tmp/rerun20k
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workspace_scale import code_state, make_checkpoint, timed_subprocess  # noqa: E402  (sibling benchmark script)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A valid 8-bit greyscale PNG of a (h, w) uint8 array (filter 0 on every row)."""
    h, w = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_archive(root: Path, n: int, rng: np.random.Generator, side: int = 16, first_patient: int = 10_000_000) -> list[tuple[str, bytes]]:
    """n PNG files: patients of 1-5 studies, studies of 1-3 images. Returns (path, bytes) in write order."""
    out = []
    patient, study = first_patient, 50_000_000 + (first_patient - 10_000_000) * 10
    while len(out) < n:
        pdir = root / f"p{str(patient)[:2]}" / f"p{patient}"
        for _ in range(int(rng.integers(1, 6))):
            sdir = pdir / f"s{study}"
            sdir.mkdir(parents=True, exist_ok=True)
            for k in range(int(rng.integers(1, 4))):
                if len(out) == n:
                    break
                data = png_bytes(rng.integers(0, 256, (side, side), dtype=np.uint8))
                p = sdir / f"{k:02d}_{hashlib.blake2b(data, digest_size=4).hexdigest()}.png"
                p.write_bytes(data)
                out.append((str(p), data))
            study += 1
        patient += 1
    return out


def simulate_first_run(ws_root: Path, archive: Path, contents: dict[str, bytes], ck_path: Path, sha: str, dim: int,
                       part_rows: int, seed: int) -> float:
    """Catalog (+ embeddings + predictions) of every file, as a completed first `embed` leaves it."""
    import pyarrow as pa

    from curator.discover import walk
    from curator.pipelines.embed import register_prompt_set
    from curator.pipelines.stages import embeddings_table, predictions_table, run_record
    from curator.prompts import default_prompt_set
    from curator.workspace import CATALOG_SCHEMA, Workspace

    t0 = time.perf_counter()
    # The real discovery gives exactly the paths / sizes / mtimes a first run would have stored.
    entries = list(walk([archive]))
    ps = default_prompt_set()
    rng = np.random.default_rng(seed)
    now = dt.datetime.now(dt.timezone.utc)
    run_id = now.strftime("%Y%m%dT%H%M%S") + "-simulated"
    ws = Workspace(ws_root)
    with ws.writer():
        sets, fcols = register_prompt_set({}, {}, ps, now.isoformat())
        ws.commit(checkpoints={sha: {"path": str(ck_path.resolve()), "embed_dim": dim, "added": now.isoformat()}},
                  ensemble=[sha], prompt_sets=sets, finding_columns=fcols, modality_filter=["CR", "DX"])
        for start in range(0, len(entries), part_rows):
            batch = entries[start : start + part_rows]
            m = len(batch)
            first = int(ws.manifest["next_image_id"])
            ids = np.arange(first, first + m, dtype=np.int64)
            cols = {
                "image_id": ids,
                "path": [e.path for e in batch],
                "file_format": ["png"] * m,
                "size": [e.size for e in batch],
                "mtime_ns": [e.mtime_ns for e in batch],
                "content_hash": [hashlib.blake2b(contents[e.path], digest_size=16).hexdigest() for e in batch],
                "conversion": ["raster"] * m,
                "width": np.full(m, 16, np.int32), "height": np.full(m, 16, np.int32),
                "run_id": [run_id] * m, "added_at": [now] * m,
                "rows": np.full(m, 16, np.int32), "columns": np.full(m, 16, np.int32),
            }
            catalog = pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(m, f.type) for f in CATALOG_SCHEMA}, schema=CATALOG_SCHEMA)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            probs = rng.beta(2, 5, (m, len(ps.columns))).astype(np.float32)
            parts = [ws.write_part("catalog", catalog), ws.write_part("embeddings", embeddings_table(ids, sha, x)),
                     ws.write_part("predictions", predictions_table(ids, ps, {sha: probs, "ensemble": probs}), prompt_set=ps.id)]
            ws.commit(add=parts, next_image_id=first + m)
        rec = run_record(run_id, "embed", "completed", now, [{"sha256": sha, "path": str(ck_path)}], [ps.id],
                         {"discovered": len(entries), "processed": len(entries), "simulated": True}, {"total_s": time.perf_counter() - t0},
                         {"benchmark": "rerun_unchanged.py (simulated first run)"})
        ws.commit(add=[ws.write_part("runs", rec)])
    return time.perf_counter() - t0


def run_embed(archive: Path, ws_root: Path, ck_path: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "curator.cli", "-q", "embed", str(archive), "--workspace", str(ws_root), "--checkpoint", str(ck_path), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    r = timed_subprocess(cmd, env)
    wall, peak, stdout = r["wall_s"], r["peak_rss_mb"], r["stdout"]
    grab = lambda label: int(re.search(rf"{re.escape(label)}\s+(\d+)", stdout).group(1))  # noqa: E731
    # the run's own record in W/runs/
    from curator.query import run_query
    from curator.workspace import Workspace

    last = run_query(Workspace(ws_root), "SELECT counts, timings FROM runs WHERE command = 'embed' ORDER BY started DESC LIMIT 1", sandbox=False)
    counts = json.loads(last["counts"][0])
    return {"wall_s": wall, "peak_rss_mb": peak, "embedded": grab("embedded:"), "unchanged": grab("skipped (unchanged):"),
            "failed": grab("failed:"), "found": int(re.search(r"(\d+) files found", stdout).group(1)),
            "run_counts": counts, "run_total_s": json.loads(last["timings"][0]).get("total_s"), "stdout": stdout.strip(),
            "cmd": " ".join(cmd)}


def breakdown(archive: Path, ws_root: Path) -> dict:
    """In this process: the walk and the skip table, the two parts of a rerun that grow with N."""
    from curator.discover import walk
    from curator.workspace import Workspace

    t = time.perf_counter()
    entries = list(walk([archive]))
    walk_s = time.perf_counter() - t
    out = {"walk_s": walk_s, "walk_files": len(entries)}
    try:  # the skip table: a sorted hash table (pipelines/known.py) or, in older trees, a dict of paths
        from curator.pipelines.known import KnownFiles

        t = time.perf_counter()
        known = KnownFiles(Workspace(ws_root))
        out["known_files_s"] = time.perf_counter() - t
        out["known_files_rows"] = len(known.catalog)
        t = time.perf_counter()
        unchanged, _, _ = known.classify([e.path for e in entries], [e.size for e in entries], [e.mtime_ns for e in entries])
        out["classify_s"] = time.perf_counter() - t
        out["skip_table"] = "KnownFiles"
    except ImportError:
        from curator.pipelines.embed import known_files

        t = time.perf_counter()
        seen, _bad = known_files(Workspace(ws_root))
        out["known_files_s"] = time.perf_counter() - t
        out["known_files_rows"] = len(seen)
        t = time.perf_counter()
        sum(seen.get(e.path) == (e.size, e.mtime_ns) for e in entries)
        out["classify_s"] = time.perf_counter() - t
        out["skip_table"] = "known_files dict"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="PNG files in the archive (default 100,000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed unchanged reruns (default 3)")
    ap.add_argument("--new", type=int, default=5, help="files added before the last run (default 5)")
    ap.add_argument("--part-rows", type=int, default=4096, help="rows per simulated part (default 4096, embed's --flush-rows)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the embed subprocesses (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temporary folder, deleted)")
    ap.add_argument("--json", action="store_true", help="also print all figures as one JSON line")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    base = Path(args.keep).expanduser().resolve() if args.keep else Path(tempfile.mkdtemp(prefix="rerun-"))
    base.mkdir(parents=True, exist_ok=True)
    archive, ws_root, ck_path = base / "archive", base / "workspace", base / "tiny-clip.pt"
    if archive.exists() or ws_root.exists():
        raise SystemExit(f"{base} already holds an archive or workspace; give another --keep folder")
    res: dict = {"files": args.files, "date": dt.date.today().isoformat(), "cpus": os.cpu_count(), "threads": args.threads,
                 "code": code_state(),
                 "first_run": "simulated (catalog written directly, no image embedded)"}
    rng = np.random.default_rng(args.seed)
    try:
        t = time.perf_counter()
        written = write_archive(archive, args.files, rng)
        res["write_archive_s"] = time.perf_counter() - t
        n_dirs = sum(1 for _ in archive.rglob("s*") if _.is_dir())
        print(f"code: {res['code']}", flush=True)
        print(f"wrote {len(written):,} PNG files (16x16) in {n_dirs:,} study folders in {res['write_archive_s']:.1f} s -> {archive}", flush=True)
        sha, _ = make_checkpoint(ck_path, args.dim, args.seed)
        res["simulate_s"] = simulate_first_run(ws_root, archive, dict(written), ck_path, sha, args.dim, args.part_rows, args.seed)
        print(f"SIMULATED first run: catalog + embeddings + predictions of all {args.files:,} files written directly with the "
              f"Workspace API in {res['simulate_s']:.1f} s (checkpoint {sha[:12]})", flush=True)

        runs = []
        for i in range(args.repeats):
            r = run_embed(archive, ws_root, ck_path, args.threads)
            ok = r["embedded"] == 0 and r["unchanged"] == args.files and r["run_counts"]["processed"] == 0 and r["run_counts"]["unchanged"] == args.files
            r["ok"] = ok
            runs.append(r)
            print(f"  unchanged rerun {i + 1}: {r['wall_s']:.2f} s wall (run record total {r['run_total_s']:.2f} s), peak RSS "
                  f"{r['peak_rss_mb']:,.0f} MB, embedded {r['embedded']}, skipped unchanged {r['unchanged']:,} -> {'OK' if ok else 'WRONG'}", flush=True)
        res["rerun"] = {"times_s": [r["wall_s"] for r in runs], "median_s": statistics.median(r["wall_s"] for r in runs),
                        "run_record_total_s": [r["run_total_s"] for r in runs], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                        "embedded": [r["embedded"] for r in runs], "unchanged": [r["unchanged"] for r in runs],
                        "ok": all(r["ok"] for r in runs), "cmd": runs[0]["cmd"], "stdout": runs[0]["stdout"]}
        print(f"rerun median {res['rerun']['median_s']:.2f} s over {args.repeats}; target < 60 s: "
              f"{'met' if res['rerun']['median_s'] < 60 else 'NOT met'}", flush=True)
        res["breakdown"] = breakdown(archive, ws_root)
        b = res["breakdown"]
        print(f"  of which (in-process): walk {b['walk_s']:.2f} s ({b['walk_files']:,} files), catalog -> skip table "
              f"({b['skip_table']}) {b['known_files_s']:.2f} s ({b['known_files_rows']:,} rows), lookups {b['classify_s']:.2f} s", flush=True)

        new = write_archive(archive, args.new, rng, first_patient=19_900_000)
        r = run_embed(archive, ws_root, ck_path, args.threads)
        r["ok"] = r["embedded"] == args.new and r["unchanged"] == args.files and r["failed"] == 0
        res["with_new"] = {k: r[k] for k in ("wall_s", "peak_rss_mb", "embedded", "unchanged", "failed", "ok", "stdout")}
        print(f"+{args.new} new files: {r['wall_s']:.2f} s wall, peak RSS {r['peak_rss_mb']:,.0f} MB, embedded {r['embedded']}, "
              f"skipped unchanged {r['unchanged']:,}, failed {r['failed']} -> {'OK' if r['ok'] else 'WRONG'}", flush=True)
        from curator.query import run_query
        from curator.workspace import Workspace

        paths = {p for p, _ in new}
        got = run_query(Workspace(ws_root), "SELECT path, file_format, width FROM images WHERE run_id = (SELECT run_id FROM runs "
                        "WHERE command = 'embed' ORDER BY started DESC LIMIT 1)", sandbox=False)
        res["with_new"]["new_rows_are_the_new_files"] = set(got["path"]) == paths
        print(f"  catalog rows of that run are exactly the {len(paths)} new files: {set(got['path']) == paths}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
