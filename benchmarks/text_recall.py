"""Recall of text searches on an IVF index: nprobe tuned on image queries vs on text queries.

CLIP text embeddings lie apart from the image embeddings, so an IVF index whose nprobe is tuned
on image queries (a sample of the indexed vectors) can miss much of a text query's top 10.
`curator index` therefore tunes a second nprobe on text queries (curator/query_sample.py: the
prompt sets' findings and the bundled search phrases, plain and contrasted with "no ...") that
searches by text use. This script measures both, in one process:

  1. runs `curator demo --no-app` (synthetic DICOM archive, bundled demo model) into a temporary
     folder, or reuses --workspace;
  2. makes --n vectors from its image embeddings (mixtures of two real ones plus noise, so that the
     text/image geometry is the demo model's), builds --type over them as `curator index` does,
     with and without the text queries;
  3. measures recall@10 against brute force and single-query latency for held-out text
     searches (16 phrases that are not in the tuning sample, plain and contrasted) and for image
     queries, at the image nprobe and at the text nprobe.

    python benchmarks/text_recall.py --n 20000 --type ivf-flat --type ivf-sq8
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HELD_OUT = ["alveolar pulmonary edema", "large left pleural effusion", "enlarged heart", "small right apical pneumothorax",
            "clear lungs", "left basilar atelectasis", "right upper lobe pneumonia", "dual chamber pacemaker",
            "left lung nodule", "patchy consolidation", "blunted costophrenic angle", "vascular congestion",
            "healed rib fractures", "hyperexpanded lungs", "retrocardiac opacity", "port-a-cath"]


def demo_workspace(folder: Path, studies: int) -> Path:
    ws = folder / "ws"
    subprocess.run([sys.executable, "-m", "curator.cli", "-q", "demo", "--no-app", "--studies", str(studies), "--workspace", str(ws),
                    "--archive", str(folder / "archive"), "--image-size", "512"], check=True, stdout=subprocess.DEVNULL)
    return ws


def mixture(base: np.ndarray, n: int, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)  # an int or a list of ints
    a, b = rng.integers(0, len(base), n), rng.integers(0, len(base), n)
    w = rng.uniform(0, 0.5, (n, 1)).astype(np.float32)
    x = (1 - w) * base[a] + w * base[b] + 0.03 * rng.standard_normal((n, base.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class MixtureVectors:
    """``n`` vectors of :func:`mixture` made chunk by chunk (chunk ``i`` from its own seed), so
    that 10M of them never sit in memory at once; a VectorSource for ``build_from_source``."""

    def __init__(self, base: np.ndarray, n: int, seed: int, chunk_rows: int = 65536):
        self.base, self.count, self.dim, self.seed, self.chunk_rows = base, n, base.shape[1], seed, chunk_rows

    def chunks(self):
        for i, start in enumerate(range(0, self.count, self.chunk_rows)):
            m = min(self.chunk_rows, self.count - start)
            yield np.arange(start + 1, start + 1 + m, dtype=np.int64), mixture(self.base, m, [self.seed, 0, i])

    def sample(self, n_train, n_query, rng):
        # fresh draws of the same mixture: a sample of it; the queries are not in the index
        return mixture(self.base, n_train, [self.seed, 1]), mixture(self.base, n_query, [self.seed, 2]), None


def streamed_truth(source: MixtureVectors, queries: dict[str, np.ndarray], k: int = 10) -> dict[str, np.ndarray]:
    """Exact top-``k`` ids of each query set over every vector of ``source``, chunk by chunk."""
    best = {name: (np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)) for name, q in queries.items()}
    for ids, x in source.chunks():
        for name, q in queries.items():
            sims = q @ x.T
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if len(ids) > k else np.broadcast_to(np.arange(len(ids)), sims.shape)
            s, i = best[name]
            s = np.concatenate([s, np.take_along_axis(sims, part, 1)], axis=1)
            i = np.concatenate([i, ids[part]], axis=1)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best[name] = (np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1))
    return {name: i for name, (_, i) in best.items()}


def measure(index, queries: np.ndarray, truth: np.ndarray, nprobe: int | None) -> tuple[float, float]:
    """(recall@10, median ms per single query) at ``nprobe``."""
    from curator import index as ci

    found, lat = [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        _, ids = ci.search_vectors(index, queries[i:i + 1], 10, nprobe=nprobe)
        lat.append(time.perf_counter() - t)
        found.append(ids[0])
    return ci.recall_at_k(np.array(found), truth, 10), 1000 * statistics.median(lat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--type", action="append", choices=["ivf-flat", "ivf-sq8", "ivf-pq"], help="repeatable (default ivf-flat)")
    ap.add_argument("--workspace", default=None, help="a workspace embedded with the demo model (default: run the demo)")
    ap.add_argument("--studies", type=int, default=150, help="studies of the demo archive (default 150)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads of the searches (default 1)")
    ap.add_argument("--build-threads", type=int, default=None, help="FAISS threads of the build (default --threads)")
    ap.add_argument("--stream", action="store_true",
                    help="make the vectors chunk by chunk, never all in memory (on by itself above 2,000,000)")
    ap.add_argument("--sweep", action="store_true", help="also measure the held-out text searches at 2x / 4x the text nprobe "
                                                           "and with 4x / 16x the re-ranked candidates")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import faiss
    import pyarrow.parquet as pq

    from curator import index as ci
    from curator import query_sample as qs
    from curator.search import Searcher
    from curator.workspace import Workspace

    stream = args.stream or args.n > 2_000_000
    out: dict = {"n": args.n, "threads": args.threads, "build_threads": args.build_threads or args.threads, "streamed": stream, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        ws_path = Path(args.workspace) if args.workspace else demo_workspace(Path(tmp), args.studies)
        ws = Workspace(ws_path)
        searcher = Searcher(ws, device="cpu")
        base = np.concatenate([np.stack(pq.read_table(f, columns=["embedding"]).column(0).to_numpy(zero_copy_only=False))
                               for f in sorted(glob.glob(str(ws_path / "embeddings" / "*.parquet")))]).astype(np.float32)
        if stream:
            source = MixtureVectors(base, args.n, 0)
            x = next(source.chunks())[1]  # (for the mean similarities below)
        else:
            x = mixture(base, args.n, 0)
            ids = np.arange(1, args.n + 1, dtype=np.int64)
            source = ci.ArrayVectors(ids, x)
        tune, groups = qs.vectors(searcher.checkpoint, qs.query_texts(ws))
        assert not set(HELD_OUT) & set(qs.query_texts(ws))
        held, _ = qs.vectors(searcher.checkpoint, HELD_OUT)  # plain, then contrasted
        images = mixture(base, 200, 1)
        t0 = time.perf_counter()
        if stream:
            truth = streamed_truth(source, {"text": held, "image": images})
        else:
            truth = {name: ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]] for name, q in (("text", held), ("image", images))}
        out["brute_force_s"] = round(time.perf_counter() - t0, 1)
        out.update(base_images=len(base), tuning_text_queries=len(tune), held_out_text_queries=len(held),
                   mean_text_image_similarity=float((held[:16] @ x[:2000].T).mean()),
                   mean_image_image_similarity=float((images[:100] @ x[:2000].T).mean()))
        for kind in args.type or ["ivf-flat"]:
            plan = ci.choose_index(args.n, x.shape[1], None, kind, refine=kind != "ivf-flat")
            with tempfile.TemporaryDirectory() as rd:
                faiss.omp_set_num_threads(args.build_threads or args.threads)
                t0 = time.perf_counter()
                index, rep = ci.build_from_source(source, plan, refine_dir=Path(rd) if plan.refine else None,
                                                  text_queries=tune, text_groups=groups)
                build_s = time.perf_counter() - t0
                faiss.omp_set_num_threads(args.threads)
                row = {"type": kind, "description": plan.describe(), "build_s": round(build_s, 2), "nprobe": rep.nprobe,
                       "nprobe_text": rep.nprobe_text, "build_recall_at_10": rep.recall_at_10, "build_recall_at_10_text": rep.recall_at_10_text}
                for qname, q in (("text", held), ("image", images)):
                    for at, p in (("image_nprobe", rep.nprobe), ("text_nprobe", rep.nprobe_text or rep.nprobe)):
                        r, ms = measure(index, q, truth[qname], p)
                        row[f"{qname}_recall_at_{at}"], row[f"{qname}_ms_at_{at}"] = round(r, 4), round(ms, 3)
                row["tune_curve"], row["tune_curve_text"] = rep.tune_curve, rep.tune_curve_text
                if args.sweep:  # held-out text recall by lists probed and by re-ranked candidates
                    from curator import refine as rf

                    factor = rf.REFINE_FACTOR
                    base_p = rep.nprobe_text or rep.nprobe
                    probes = sorted({min(ci._ivf_of(index).nlist, m * base_p) for m in (1, 2, 4)})
                    sweep = []
                    try:
                        for f in sorted({factor, 4 * factor, 16 * factor}) if plan.refine else [factor]:
                            rf.REFINE_FACTOR = f
                            for p in probes:
                                r, ms = measure(index, held, truth["text"], p)
                                sweep.append({"refine_factor": f, "nprobe": p, "text_recall": round(r, 4), "ms": round(ms, 3)})
                    finally:
                        rf.REFINE_FACTOR = factor
                    row["text_sweep"] = sweep
                out["runs"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.n} vectors from {out['base_images']} demo-model image embeddings; {out['tuning_text_queries']} tuning text queries, "
          f"{out['held_out_text_queries']} held-out; mean similarity text-image {out['mean_text_image_similarity']:.3f}, "
          f"image-image {out['mean_image_image_similarity']:.3f}; {args.threads} thread(s)")
    for r in out["runs"]:
        print(f"  {r['description']}: nprobe {r['nprobe']} (image) / {r['nprobe_text']} (text)")
        print(f"    held-out text searches: recall@10 {r['text_recall_at_image_nprobe']:.3f} at the image nprobe "
              f"({r['text_ms_at_image_nprobe']:.2f} ms) -> {r['text_recall_at_text_nprobe']:.3f} at the text nprobe "
              f"({r['text_ms_at_text_nprobe']:.2f} ms)")
        print(f"    image searches:         recall@10 {r['image_recall_at_image_nprobe']:.3f} ({r['image_ms_at_image_nprobe']:.2f} ms)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
