"""``curator bench index``: build the index the tool would choose for N synthetic vectors and
measure it (build time, latency, recall@10 against exact search, filtered search, memory).

The vectors are a mixture of Gaussians on the unit sphere (cluster centres, and sub-centres
around them, with points spread around those) pulled towards one shared direction, as CLIP image
embeddings are (their mean has norm ~0.9), made chunk by chunk from a seed, so a run never holds
them all. Exact ground truth is computed chunk by chunk as they are added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from curator import index as ci
from curator import refine as rf


# weight of the direction all synthetic vectors share (the norm of their mean, about)
COMMON = 0.9


class SyntheticVectors(ci.VectorSource):
    """N clustered unit vectors (ids 1..N), generated in chunks from ``seed``.

    Two levels: ``clusters`` centres uniform on the sphere, ``sub`` sub-centres around each
    (angular spread ~0.8), points around a sub-centre (noise norm drawn per cluster in
    [0.35, 0.7], times ``noise``: larger values make neighbourhoods straddle IVF lists). Each point
    z is then moved towards one direction u shared by all: ``normalise(common * u + sqrt(1 -
    common^2) * z)`` (the mean vector's norm is then ~``common``; 0 gives zero-mean vectors). The
    neighbour order is (nearly) that of the z, but codes trained on the raw vectors rather than on
    their residuals from the IVF centroids lose most of it. The same seed gives the same vectors
    whatever the threads of the reader.
    """

    def __init__(self, n: int, dim: int, seed: int = 0, clusters: int | None = None, sub: int = 16,
                 chunk_rows: int = 32768, threads: int = 1, noise: float = 1.0, common: float = COMMON):
        self.count, self.dim, self.seed = int(n), int(dim), int(seed)
        self.chunk_rows = chunk_rows
        self.threads = max(1, threads)
        rng = np.random.default_rng([seed, 7])
        k = clusters or int(np.clip(n // 2000, 16, 2048))
        centres = _unit(rng.standard_normal((k, dim), dtype=np.float32))
        subs = centres[np.repeat(np.arange(k), sub)] + 0.8 * rng.standard_normal((k * sub, dim), dtype=np.float32) / math.sqrt(dim)
        self.means = _unit(subs)
        self.scale = noise * np.repeat(rng.uniform(0.35, 0.7, k), sub).astype(np.float32) / math.sqrt(dim)
        if not 0.0 <= common < 1.0:
            raise ValueError(f"common must be in [0, 1), got {common}")
        self.common = float(common)
        # drawn from its own stream, so common=0 gives the same vectors as before it existed
        self.direction = _unit(np.random.default_rng([seed, 9]).standard_normal((1, dim), dtype=np.float32))[0]
        self.gen_s = 0.0

    def _draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        a = rng.integers(0, len(self.means), m)
        x = rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= self.scale[a, None]
        x += self.means[a]
        x = _unit(x)
        if self.common:
            x *= np.float32(math.sqrt(1.0 - self.common ** 2))
            x += np.float32(self.common) * self.direction
            x = _unit(x)
        return x

    def _chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = i * self.chunk_rows
        m = min(self.chunk_rows, self.count - start)
        return np.arange(start + 1, start + 1 + m, dtype=np.int64), self._draw(m, np.random.default_rng([self.seed, 1, i]))

    def chunks(self):
        n_chunks = (self.count + self.chunk_rows - 1) // self.chunk_rows
        if self.threads == 1:
            for i in range(n_chunks):
                t = time.perf_counter()
                c = self._chunk(i)
                self.gen_s += time.perf_counter() - t
                yield c
            return
        with ThreadPoolExecutor(self.threads) as pool:  # numpy's generators release the GIL
            ahead = min(n_chunks, self.threads, 4)  # chunks in flight: bounded memory
            pending = [pool.submit(self._chunk, i) for i in range(ahead)]
            nxt = len(pending)
            while pending:
                t = time.perf_counter()
                c = pending.pop(0).result()
                self.gen_s += time.perf_counter() - t
                if nxt < n_chunks:
                    pending.append(pool.submit(self._chunk, nxt))
                    nxt += 1
                yield c

    def fresh(self, m: int, stream: int) -> np.ndarray:
        """``m`` new vectors from the same mixture (not in the index)."""
        return self._draw(m, np.random.default_rng([self.seed, 2, stream]))

    def sample(self, n_train, n_query, rng):
        # the mixture is known: fresh draws are a sample of it, and the queries are held out
        return self.fresh(n_train, 0), self.fresh(n_query, 1), None


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _threads(n: int):
    """Limit FAISS (OpenMP) and numpy's BLAS to ``n`` threads."""
    import faiss

    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(n)
    except ImportError:
        return contextlib.nullcontext()


def current_rss_mb() -> float:
    """Resident memory now (Linux; else the peak so far)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_index_bench(n: int, dim: int, *, budget_gb: float | None = None, kind: str = "auto", queries: int = 200, seed: int = 0,
                    k: int = 10, threads: int = 1, build_threads: int = 1, selectivity: float = 0.01,
                    exact_max: int | None = None, recall_sample: int = ci.RECALL_SAMPLE, mmap: bool = False,
                    noise: float = 1.0, gpu: bool | None = None, common: float = COMMON, refine: bool = True) -> dict:
    """Build and measure; returns the figures as a dict (see ``curator bench index --help``).
    The refine store (kinds with 8-bit or PQ codes) is written to a temporary folder, as a
    workspace keeps it on disk, and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="curator-bench-refine-") as refine_dir:
        return _run_index_bench(n, dim, budget_gb, kind, queries, seed, k, threads, build_threads, selectivity, exact_max,
                                recall_sample, mmap, noise, gpu, common, refine, refine_dir)


def _run_index_bench(n, dim, budget_gb, kind, queries, seed, k, threads, build_threads, selectivity, exact_max, recall_sample,
                     mmap, noise, gpu, common, refine, refine_dir) -> dict:
    baseline = current_rss_mb()
    src = SyntheticVectors(n, dim, seed, threads=build_threads, noise=noise, common=common)
    plan = ci.choose_index(n, dim, budget_gb, kind, exact_max, refine=refine)
    q = src.fresh(queries, 3)
    rng = np.random.default_rng([seed, 5])
    n_allowed = max(k, round(n * selectivity))
    allowed = np.sort(rng.choice(n, size=min(n, n_allowed), replace=False).astype(np.int64) + 1)
    kk = max(k, ci.RECALL_K)  # (recall_at_10 is recall@10 whatever k is)
    truth = ci.ExactTopK(q, kk)
    truth_f = ci.ExactTopK(q, kk, restrict=allowed)
    gt_s = [0.0]

    def observe(ids, vecs):
        t = time.perf_counter()
        truth(ids, vecs)
        truth_f(ids, vecs)
        gt_s[0] += time.perf_counter() - t

    with _threads(build_threads):
        t0 = time.perf_counter()
        index, rep = ci.build_from_source(src, plan, recall_sample=recall_sample, seed=seed, on_chunk=[observe], gpu=gpu,
                                          refine_dir=refine_dir)
        total = time.perf_counter() - t0
    gt_sims, gt = truth.result()
    _, gt_f = truth_f.result()
    file_mb = None
    if mmap:  # measure the index as the app opens it: written, then memory-mapped (the mapping
        import faiss  # outlives the file's name)

        with tempfile.TemporaryDirectory(prefix="curator-bench-") as d:
            path = os.path.join(d, "index.faiss")
            faiss.write_index(index, path)
            del index
            index = ci.read_index_file(path, plan.kind, mmap=True)
            ci.attach_refine(index, rep.refine)
            file_mb = round(os.path.getsize(path) / 2**20, 1)
    with _threads(threads):
        ci.search_vectors_filtered(index, q[:1], k)  # warm up
        lat, found = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            _, ids = ci.search_vectors_filtered(index, q[i:i + 1], k)
            lat.append(time.perf_counter() - t)
            found.append(ids[0])
        flat_, ffound = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            _, ids = ci.search_vectors_filtered(index, q[i:i + 1], k, allowed)
            flat_.append(time.perf_counter() - t)
            ffound.append(ids[0])
        if k < ci.RECALL_K:  # recall@10 needs 10 results: untimed searches for it
            found10 = [ci.search_vectors_filtered(index, q[i:i + 1], ci.RECALL_K)[1][0] for i in range(len(q))]
            ffound10 = [ci.search_vectors_filtered(index, q[i:i + 1], ci.RECALL_K, allowed)[1][0] for i in range(len(q))]
        else:
            found10, ffound10 = found, ffound
        thr = float(np.median(gt_sims[:, min(k, gt_sims.shape[1]) - 1])) if gt_sims.size else 0.5  # a cut keeping ~k images a query
        rlat, rcount = [], []
        for i in range(min(len(q), max(5, min(50, 50_000_000 // n)))):  # a range scan can cover much of the index
            t = time.perf_counter()
            ids, _ = ci.range_search(index, q[i], thr)
            rlat.append(time.perf_counter() - t)
            rcount.append(len(ids))
    ffound = np.array(ffound)
    # (k, or every allowed image where fewer are allowed)
    k_returned = float(np.mean([(row >= 0).sum() == min(k, len(allowed)) and np.isin(row[row >= 0], allowed).all() for row in ffound]))

    def pct(xs, p):
        return round(1000 * float(np.percentile(xs, p)), 3)

    build_s = total - src.gen_s - gt_s[0]
    return {
        "n": n, "dim": dim, "noise": noise, "common": common, "index_type": plan.kind, "description": plan.describe(), "reason": plan.reason,
        "nlist": plan.nlist, "nprobe": rep.nprobe, "pq_m": plan.pq_m, "gpu": rep.gpu,
        "budget_gb": round(plan.budget_bytes / 2**30, 3), "budget_default": budget_gb is None, "est_gb": round(plan.est_bytes / 2**30, 3),
        "build_s": round(build_s, 2), "train_s": round(rep.train_s, 2), "tune_s": round(rep.tune_s, 2),
        "generate_s": round(src.gen_s, 2), "ground_truth_s": round(gt_s[0], 2),
        "queries": len(q), "k": k, "threads": threads, "build_threads": build_threads,
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
        "recall_at_10": round(ci.recall_at_k(np.array(found10), gt, ci.RECALL_K) or 0.0, 4),
        "recall_at_k": round(ci.recall_at_k(np.array(found), gt, k) or 0.0, 4),
        "build_recall_at_10": None if rep.recall_at_10 is None else round(rep.recall_at_10, 4),
        "filtered_selectivity": selectivity, "filtered_allowed": len(allowed),
        "filtered_p50_ms": pct(flat_, 50), "filtered_p95_ms": pct(flat_, 95),
        "filtered_k_returned_fraction": round(k_returned, 4),
        "filtered_recall_at_10": round(ci.recall_at_k(np.array(ffound10), gt_f, ci.RECALL_K) or 0.0, 4),
        "filtered_recall_at_k": round(ci.recall_at_k(ffound, gt_f, k) or 0.0, 4),
        "range_threshold": round(thr, 4), "range_p50_ms": pct(rlat, 50), "range_mean_results": round(float(np.mean(rcount)), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
        "mmap": bool(mmap), "file_mb": file_mb,
        "refine": rep.refine is not None, "refine_disk_mb": round(rf.disk_bytes(n, dim) / 2**20, 1) if rep.refine is not None else 0.0,
        "refine_error": None if rep.refine is None else round(rep.refine.error, 5),
    }


def _positive(kind):
    def parse(v):
        x = kind(v)
        if x <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
        return x
    parse.__name__ = kind.__name__  # (argparse names the type in "invalid int value: 'abc'")
    return parse


def _number(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None


def _share(v):
    x = _number(v)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {v}")
    return x


def _unit_interval(v):
    x = _number(v)
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {v}")
    return x


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (index)", description="Measure parts of curator on synthetic data.")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    b = bsub.add_parser(
        "index", help="build and measure the index the tool would choose for N synthetic vectors",
        description="Build the index `curator index` would choose for N clustered synthetic unit vectors (a mixture of Gaussians "
        "on the sphere sharing one direction, as CLIP image embeddings do (--common), generated in chunks from --seed) and print: index_type, build_s, p50_ms, p95_ms, recall_at_10 (against "
        "exact search), filtered_p50_ms and filtered_k_returned_fraction (filtered queries at 1% selectivity that return k), "
        "peak_rss_mb and more.")
    b.add_argument("--n", type=_positive(int), required=True, help="number of vectors")
    b.add_argument("--dim", type=_positive(int), default=512, help="dimension (default 512)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--budget-gb", type=_positive(float), default=None, help="memory budget (default: half the memory)")
    b.add_argument("--type", default="auto", choices=["auto", *ci.KINDS], help="index type (default auto)")
    b.add_argument("--queries", type=_positive(int), default=200, help="timed queries (default 200)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("-k", type=_positive(int), default=10, help="results per query (default 10)")
    b.add_argument("--threads", type=_positive(int), default=1, help="threads for the timed searches (default 1)")
    b.add_argument("--build-threads", type=_positive(int), default=1, help="threads for the build (default 1)")
    b.add_argument("--selectivity", type=_share, default=0.01, help="share of images a filter admits (default 0.01)")
    b.add_argument("--exact-max", type=int, default=None, help=f"exact search up to this many vectors (default {ci.EXACT_MAX:,})")
    b.add_argument("--cpu", action="store_true", help="build on the CPU even when a GPU is present")
    b.add_argument("--noise", type=_positive(float), default=1.0, help="scale of the points' spread around their centres (default 1)")
    b.add_argument("--common", type=_unit_interval, default=COMMON,
                   help=f"weight of the direction the vectors share, ~ the norm of their mean (default {COMMON}, as CLIP "
                   "image embeddings; 0: zero-mean vectors)")
    b.add_argument("-v", "--verbose", action="store_true", help="log the build's stages to standard error")
    b.add_argument("--mmap", action="store_true", help="write the index and search it memory-mapped, as the app opens large indexes")
    b.add_argument("--no-refine", action="store_true", help="no re-ranking from float16 copies (codes alone), as `curator index --no-refine`")
    b.set_defaults(func=cmd_bench_index)


def cmd_bench_index(args) -> int:
    if getattr(args, "verbose", False):
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("curator.index").setLevel(logging.INFO)
    out = run_index_bench(args.n, args.dim, budget_gb=args.budget_gb, kind=args.type, queries=args.queries, seed=args.seed, k=args.k,
                          threads=args.threads, build_threads=args.build_threads, selectivity=args.selectivity, exact_max=args.exact_max,
                          mmap=args.mmap, noise=args.noise, gpu=False if args.cpu else None, common=args.common, refine=not args.no_refine)
    if args.json:
        print(json.dumps(out))
    else:
        for key, v in out.items():
            print(f"{key:30s} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m curator.bench index ...``: the same as ``curator bench index`` without loading
    the rest of the command line (and its imports), so peak_rss_mb is the benchmark's own."""
    parser = argparse.ArgumentParser(prog="python -m curator")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # (e.g. no index fits --budget-gb)
        print(f"curator bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
