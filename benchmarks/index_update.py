"""Index update after images leave the catalog: in place vs the full rebuild it replaced.

A changed file (its old row superseded) or `curator embed --prune` (retired rows) takes images
out of the catalog; the index update at the end of `embed` (`curator.index.sync_index`) used to
rebuild the whole index then (~23 min at 10M on this machine). It now copies the other codes,
drops the images that left and appends the new ones. This script measures both on one
synthetic workspace, in one run:

  1. builds a workspace of --n images (benchmarks/workspace_scale.py's generator: clustered
     512-d embeddings, MIMIC-like catalog) and `curator index --type T` over it;
  2. --cycles times: retires --remove random current images (superseded rows with no successor,
     as `embed --prune` writes them) and adds --add new ones (catalog, embeddings, predictions
     parts), then runs `sync_index` in a subprocess under /usr/bin/time -v (wall, peak RSS),
     checks the index holds exactly the current ids, and measures recall@10 of a fixed query
     sample (current images, their own id left out) against exact search over the current
     embeddings;
  3. rebuilds the index (`curator index --type T`, what the update did before) on the final
     state: wall, peak RSS, recall@10 on the same queries.

Prints the median update time over the cycles, the rebuild time and their ratio.

    nice -n 5 python benchmarks/index_update.py --n 1000000 --type ivf-sq8
    nice -n 5 python benchmarks/index_update.py --n 200000 --type sq8 --cycles 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace_scale import Generator, build, code_state, make_checkpoint, timed_subprocess  # noqa: E402

UPDATE = """
import sys, time
from curator import index as ci
from curator.workspace import Workspace
ws = Workspace(sys.argv[1])
t = time.perf_counter()
with ws.writer():
    info = ci.sync_index(ws)
print(f"{time.perf_counter() - t:.3f} {info.count} {info.appended_at is not None} {info.trained_at}")
"""


def change(root: Path, gen: Generator, rng: np.random.Generator, remove: int, add: int, sha: str,
           protect: np.ndarray | None = None) -> np.ndarray:
    """Retire ``remove`` random current images (none of ``protect``) and add ``add`` new ones
    (one commit each)."""
    import pyarrow as pa

    from curator.pipelines.stages import embeddings_table, predictions_table
    from curator.prompts import default_prompt_set
    from curator.query import run_query
    from curator.workspace import SUPERSEDED_SCHEMA, Workspace

    ws = Workspace(root)
    cur = run_query(ws, "SELECT image_id, path FROM catalog")
    if protect is not None:
        cur = cur[~np.isin(cur.image_id.to_numpy(np.int64), protect)]
    pick = rng.choice(len(cur), size=remove, replace=False)
    ids = cur.image_id.to_numpy(np.int64)[pick]
    paths = cur.path.to_numpy()[pick]
    now = dt.datetime.now(dt.timezone.utc)
    run_id = now.strftime("%Y%m%dT%H%M%S") + "-update"
    ps = default_prompt_set()
    with ws.writer():
        sup = pa.table({"image_id": pa.array(ids, pa.int64()), "path": pa.array(paths.tolist(), pa.string()),
                        "superseded_by": pa.nulls(remove, pa.int64()), "run_id": pa.array([run_id] * remove)}, schema=SUPERSEDED_SCHEMA)
        ws.commit(add=[ws.write_part("superseded", sup)])
        first = int(ws.manifest["next_image_id"])
        ch = gen.chunk(first, add, now, run_id)
        parts = [ws.write_part("catalog", ch["catalog"]), ws.write_part("embeddings", embeddings_table(ch["ids"], sha, ch["emb"])),
                 ws.write_part("predictions", predictions_table(ch["ids"], ps, {sha: ch["probs"], "ensemble": ch["probs"]}),
                               row_group_size=add, prompt_set=ps.id)]
        ws.commit(add=parts, next_image_id=first + add)
    return ids


def truth_for(root: Path, sha: str, qids: np.ndarray, k: int = 10):
    """Exact top-(k+1) over the current embeddings for the query images (their own id dropped later)."""
    from curator import index as ci
    from curator.workspace import Workspace

    src = ci.WorkspaceVectors(Workspace(root), sha)
    got, q = src.take(qids)
    if not np.array_equal(got, qids):
        raise SystemExit("a query image left the catalog")
    exact = ci.ExactTopK(q, k + 1)
    for ids, x in src.chunks():
        exact(ids, x)
    return q, exact.result()[1], np.sort(src.ids)


def recall(root: Path, q: np.ndarray, truth: np.ndarray, qids: np.ndarray, current: np.ndarray) -> float:
    from curator import index as ci
    from curator.workspace import Workspace

    index, _ = ci.load_index(Workspace(root))
    have = np.sort(ci.index_ids(index))
    if not np.array_equal(have, current):
        raise SystemExit(f"the index holds {len(have):,} ids, not the {len(current):,} current ones")
    _, got = ci.search_vectors(index, q, 11)
    return float(ci.recall_at_k(got, truth, 10, self_ids=qids))


def index_disk_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in (root / "index").iterdir() if p.is_file()) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="images (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--type", default="ivf-sq8", choices=["flat", "fp16", "sq8", "ivf-flat", "ivf-sq8", "ivf-pq"])
    ap.add_argument("--remove", type=int, default=1000, help="images leaving per cycle (default 1,000)")
    ap.add_argument("--add", type=int, default=1000, help="images added per cycle (default 1,000)")
    ap.add_argument("--cycles", type=int, default=3, help="remove + add + update cycles (default 3)")
    ap.add_argument("--queries", type=int, default=400, help="recall@10 queries (default 400)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, metavar="DIR", help="build in DIR and keep it (default: a temporary folder, deleted)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from curator.prompts import default_prompt_set

    base = Path(args.keep).expanduser().resolve() if args.keep else Path(tempfile.mkdtemp(prefix="index-update-"))
    base.mkdir(parents=True, exist_ok=True)
    root = base / "workspace"
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists and is not empty; give another --keep folder")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    res: dict = {"n": args.n, "dim": args.dim, "type": args.type, "remove": args.remove, "add": args.add, "cycles": args.cycles,
                 "threads": args.threads, "date": dt.date.today().isoformat(), "code": code_state()}
    try:
        print(f"code: {res['code']}", flush=True)
        sha, _ = make_checkpoint(base / "tiny-clip.pt", args.dim, args.seed)
        built = build(root, args.n, args.dim, 65536, 4, base / "tiny-clip.pt", sha, args.seed, [])
        print(f"workspace: {args.n:,} images in {built['build_s']:.0f} s", flush=True)
        index_cmd = [sys.executable, "-m", "curator.cli", "-q", "index", "--workspace", str(root), "--type", args.type]
        first = timed_subprocess(index_cmd, env)
        res["first_build"] = {"wall_s": round(first["wall_s"], 2), "peak_rss_mb": round(first["peak_rss_mb"])}
        print(f"curator index --type {args.type}: {first['wall_s']:.1f} s, peak {first['peak_rss_mb']:,.0f} MB; "
              f"index files {index_disk_mb(root):,.0f} MB", flush=True)
        ps = default_prompt_set()
        gen = Generator(args.n, args.dim, ps.columns, [f.name for f in ps.findings], args.seed + 7)
        gen.next_study, gen.next_patient = 90_000_000, 40_000_000
        rng = np.random.default_rng(args.seed + 3)
        cycles = []
        qids = None
        for c in range(args.cycles):
            gone = change(root, gen, rng, args.remove, args.add, sha, protect=qids)
            u = timed_subprocess([sys.executable, "-c", UPDATE, str(root)], env)
            secs, count, updated, _ = u["stdout"].split()
            if updated != "True":
                raise SystemExit("the update rebuilt the index instead of updating it")
            if qids is None:  # one query sample for every measurement: images no later cycle retires
                from curator import index as ci
                from curator.workspace import Workspace

                cur = ci.current_ids(Workspace(root), sha)
                qids = np.sort(rng.choice(cur, size=args.queries, replace=False))
            q, truth, current = truth_for(root, sha, qids)
            rec = recall(root, q, truth, qids, current)
            cycles.append({"update_s": float(secs), "process_s": round(u["wall_s"], 2), "peak_rss_mb": round(u["peak_rss_mb"]),
                           "count": int(count), "recall_at_10": round(rec, 4), "index_disk_mb": round(index_disk_mb(root))})
            print(f"cycle {c + 1}: -{len(gone):,} +{args.add:,} -> {int(count):,} images; update {float(secs):.2f} s "
                  f"(process {u['wall_s']:.1f} s, peak {u['peak_rss_mb']:,.0f} MB); recall@10 {rec:.4f}; index files "
                  f"{index_disk_mb(root):,.0f} MB", flush=True)
        res["cycles_detail"] = cycles
        med = statistics.median(c["update_s"] for c in cycles)
        med_proc = statistics.median(c["process_s"] for c in cycles)
        rb = timed_subprocess(index_cmd, env)
        rec_rb = recall(root, q, truth, qids, current)
        res["rebuild"] = {"wall_s": round(rb["wall_s"], 2), "peak_rss_mb": round(rb["peak_rss_mb"]), "recall_at_10": round(rec_rb, 4),
                          "index_disk_mb": round(index_disk_mb(root))}
        res["update_median_s"] = med
        res["update_process_median_s"] = med_proc
        res["rebuild_over_update"] = round(rb["wall_s"] / med_proc, 1)
        print(f"rebuild (curator index --type {args.type}, the update's old behaviour): {rb['wall_s']:.1f} s, peak "
              f"{rb['peak_rss_mb']:,.0f} MB, recall@10 {rec_rb:.4f}", flush=True)
        print(f"update median {med:.2f} s in sync_index ({med_proc:.1f} s with the process start); rebuild / update "
              f"= {res['rebuild_over_update']}x", flush=True)
        if args.json:
            print(json.dumps(res))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
