"""FAISS inner-product index over one checkpoint's normalised image embeddings.

Ids are the catalog's ``image_id``; on normalised vectors the inner product is the cosine.

Which index (:func:`choose_index`), by archive size N and a memory budget:

- ``N <= EXACT_MAX``: exact search over flat codes in an ``IndexIDMap2``: ``flat``
  (``IndexFlatIP``, float32), else ``fp16`` or ``sq8`` (``IndexScalarQuantizer``) when the float32
  vectors do not fit the budget;
- beyond: IVF, the first of ``ivf-flat``, ``ivf-sq8``, ``ivf-pq`` that fits. ``nlist ~ 4*sqrt(N)``
  coarse centroids from spherical k-means on a sample; the vectors are added with their image ids
  (no IDMap); ``nprobe`` is the smallest that reaches recall@10 >= 0.95 (plus a margin,
  :func:`tune_margin`, when it can) against exact search on sample queries, and the recall
  reported is measured on a second, held-out half of them (text queries: two parts tune, the
  larger nprobe is kept, a third part measures);
- sq8, ivf-sq8 and ivf-pq re-rank their codes' candidates from float16 copies of the vectors
  kept on disk (:mod:`curator.refine`; ``refine=False`` / ``--no-refine`` to go without): 8-bit
  codes rank the close neighbours of near-duplicate films out of order.

Builds stream the embeddings Parquet parts chunk by chunk (the vectors are never one array) and
give the index its storage once, at its final size (FAISS's own ``add`` grows its buffers by
doubling, up to twice the index in memory). Updating (:func:`sync_index`) copies the old index
into storage of the new size, less the images that left the catalog, and adds only the new
images: no retraining, no re-encoding.
index.json records which workspace state the index holds (:func:`index_source_key`, a hash of
the part lists); :func:`index_staleness` tells searches when it is not the manifest's.

The heavy arithmetic of a build (k-means, assigning vectors to lists, exact ground truth) is plain
matrix products in numpy, or FAISS GPU when present; the index itself always lives on the CPU (it
is written with ``write_index`` and filtered search needs the CPU index). Large indexes are opened
memory-mapped (read-only). See ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curator import refine as rf
from curator.workspace import Workspace, WorkspaceError, atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_META = "index.json"

EXACT_KINDS = ("flat", "fp16", "sq8")
IVF_KINDS = ("ivf-flat", "ivf-sq8", "ivf-pq")
KINDS = EXACT_KINDS + IVF_KINDS
# kinds whose codes rank near neighbours out of order: re-ranked from float16 copies (refine.py)
REFINE_KINDS = ("sq8", "ivf-sq8", "ivf-pq")
# Exact (flat) search up to this many vectors: one query scans every code, ~150 ms per million
# 512-d float32 vectors on one core; beyond it IVF answers in milliseconds.
EXACT_MAX = 1_000_000
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_SAMPLE = 1000
# indexes at least this large are opened memory-mapped by default
MMAP_MIN_BYTES = 256 << 20
# rows per chunk when streaming vectors, and at most per block (of ~128 MB of codes) when
# filling inverted lists
CHUNK_ROWS = 32768
FILL_ROWS = 262_144
# an index update removes the images that left the catalog (changed files, `embed --prune`) in
# place, unless more than this share of the index left: then it is built again
REMOVE_MAX = 0.5
KMEANS_ITER = 10
TRAIN_MAX = 262_144
_LEGACY_TYPES = {"IDMap2,FlatIP": "flat"}

# memory per vector beyond its code: IndexIDMap2's id array and reverse hash map; IVF's stored
# id and the hash-table direct map that lets reconstruct() find a vector by image id
_IDMAP_BYTES = 56
_IVF_ID_BYTES = 8 + 48


def _faiss():
    import faiss

    return faiss


def _stash(index, name: str, value) -> None:
    """Cache a value on a FAISS index object (FAISS refuses unknown attributes through setattr)."""
    object.__setattr__(index, name, value)


def use_gpu() -> bool:
    """FAISS's GPU build is installed and sees a GPU."""
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a GPU build without a usable driver
        return False


# device for the torch backend (tests set "cpu" to run its code without a GPU)
_TORCH_DEVICE = "cuda"


def _torch_cuda() -> bool:
    """torch sees a CUDA GPU (torch is imported only where it already is, or a GPU exists)."""
    import sys

    if "torch" not in sys.modules and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a fallback path
        return False


def gpu_backend(gpu: bool | str | None = None) -> str | None:
    """Where a build's k-means and list assignment run: "faiss" (FAISS GPU), "torch" (torch on
    CUDA, when FAISS is the CPU build) or None (numpy on the CPU). ``gpu``: None = auto, False =
    CPU, True = a GPU if there is one, or a backend name."""
    if gpu is False:
        return None
    if isinstance(gpu, str):
        return gpu
    if use_gpu():
        return "faiss"
    if _torch_cuda():
        return "torch"
    return None


# ------------------------------------------------------------------------------------------------
# Choosing the index


@dataclass
class IndexPlan:
    """What to build: the kind and its parameters, with the memory estimate behind the choice."""

    kind: str
    n: int
    dim: int
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 8
    train_size: int = 0
    est_bytes: int = 0
    budget_bytes: int = 0
    requested: str = "auto"
    reason: str = ""
    refine: bool = False  # re-rank the codes' candidates from float16 copies on disk

    @property
    def is_ivf(self) -> bool:
        return self.kind in IVF_KINDS

    def describe(self) -> str:
        """A FAISS index-factory-like description, e.g. ``IVF4000,SQ8``."""
        return describe(self.kind, self.nlist, self.pq_m, self.pq_nbits)


def describe(kind: str, nlist: int = 0, pq_m: int = 0, pq_nbits: int = 8) -> str:
    return {
        "flat": "IDMap2,Flat", "fp16": "IDMap2,SQfp16", "sq8": "IDMap2,SQ8",
        "ivf-flat": f"IVF{nlist},Flat", "ivf-sq8": f"IVF{nlist},SQ8", "ivf-pq": f"IVF{nlist},PQ{pq_m}x{pq_nbits}",
    }[kind]


def code_bytes(kind: str, dim: int, pq_m: int = 0) -> int:
    return {"flat": 4 * dim, "fp16": 2 * dim, "sq8": dim, "ivf-flat": 4 * dim, "ivf-sq8": dim, "ivf-pq": pq_m}[kind]


def ivf_nlist(n: int) -> int:
    """~4 sqrt(N) lists, but at least ~39 vectors per list to train on."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))


def train_size(kind: str, n: int, nlist: int) -> int:
    if kind in IVF_KINDS:
        return int(min(n, max(20_000, 32 * nlist), TRAIN_MAX))
    if kind == "sq8":
        return int(min(n, 65_536))
    return 0


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0) -> int:
    """Resident size of the index (codes, ids, id maps, centroids)."""
    per = code_bytes(kind, dim, pq_m) + (_IDMAP_BYTES if kind in EXACT_KINDS else _IVF_ID_BYTES)
    fixed = 4 * dim * nlist + (256 * 4 * dim if kind == "ivf-pq" else 0)
    return int(n * per + fixed)


def _build_transient_bytes(kind: str, n: int, dim: int, nlist: int) -> int:
    """Memory a build needs besides the index: the training sample and the streaming buffers."""
    return int(train_size(kind, n, nlist) * dim * 4 + 8 * min(n, CHUNK_ROWS) * dim * 4 + (64 << 20))


def default_budget_bytes() -> int:
    """Half of the machine's memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _pq_params(dim: int, budget: int | None, n: int, nlist: int) -> tuple[int, int]:
    """(m, nbits) for IVF-PQ: the most bytes per vector (m <= dim/2, m divides dim) that fit: PQ
    codes, not nprobe, limit its recall, so it gets all the memory the budget leaves."""
    ms = [m for m in range(max(1, dim // 2), 0, -1) if dim % m == 0]
    ntrain = train_size("ivf-pq", n, nlist)
    nbits = 8 if ntrain >= 39 * 256 else int(max(4, min(8, math.floor(math.log2(max(ntrain, 16) / 39)))))
    if budget is None:
        return ms[0], nbits
    for m in ms:
        if estimate_bytes("ivf-pq", n, dim, nlist, m) + _build_transient_bytes("ivf-pq", n, dim, nlist) <= budget:
            return m, nbits
    return ms[-1], nbits


def choose_index(n: int, dim: int, budget_gb: float | None = None, kind: str = "auto", exact_max: int | None = None,
                 refine: bool = True) -> IndexPlan:
    """The index to build for ``n`` vectors of ``dim`` within ``budget_gb`` (default: half the RAM).

    ``kind="auto"``: exact (flat, then fp16, then sq8) up to ``exact_max`` vectors, else the first
    of ivf-flat, ivf-sq8, ivf-pq whose estimated memory (index + build buffers) fits the budget.
    A named ``kind`` is built as asked (the reason says when it exceeds the budget). ``refine``:
    kinds with 8-bit or PQ codes (:data:`REFINE_KINDS`) re-rank their candidates from float16
    copies of the vectors on disk (2 bytes a dimension; not counted in the memory budget).
    """
    if n <= 0 or dim <= 0:
        raise ValueError("nothing to index")
    exact_max = EXACT_MAX if exact_max is None else exact_max
    budget = int(budget_gb * (1 << 30)) if budget_gb is not None else default_budget_bytes()
    gb = f"{budget_gb:g} GB" if budget_gb is not None else _gb(budget / (1 << 30))  # (as the user gave it)

    def plan(k: str, reason: str) -> IndexPlan:
        nlist = ivf_nlist(n) if k in IVF_KINDS else 0
        m, nbits = _pq_params(dim, budget, n, nlist) if k == "ivf-pq" else (0, 8)
        est = estimate_bytes(k, n, dim, nlist, m)
        p = IndexPlan(kind=k, n=n, dim=dim, nlist=nlist, pq_m=m, pq_nbits=nbits, train_size=train_size(k, n, nlist),
                      est_bytes=est, budget_bytes=budget, requested=kind, reason=reason, refine=bool(refine) and k in REFINE_KINDS)
        if p.refine:
            disk = rf.disk_bytes(n, dim)
            size = f"{disk / (1 << 30):.1f} GB" if disk >= 1 << 30 else f"{max(1, round(disk / (1 << 20)))} MB"
            p.reason += f"; its candidates re-ranked from float16 copies of the vectors on disk (~{size})"
        return p

    def fits(k: str) -> tuple[bool, str]:
        nlist = ivf_nlist(n) if k in IVF_KINDS else 0
        m = _pq_params(dim, budget, n, nlist)[0] if k == "ivf-pq" else 0
        need = estimate_bytes(k, n, dim, nlist, m) + _build_transient_bytes(k, n, dim, nlist)
        return need <= budget, _gb(need / (1 << 30))

    if kind != "auto":
        if kind not in KINDS:
            raise ValueError(f"unknown index type {kind!r}; one of auto, {', '.join(KINDS)}")
        if kind == "ivf-pq" and n < (least := 1 << _pq_params(dim, budget, n, ivf_nlist(n))[1]):
            raise ValueError(f"ivf-pq needs at least {least} vectors to train its codes; there are {n:,}. "
                             "For so few images exact search (--type flat, or auto) is the right index")
        ok, need = fits(kind)
        return plan(kind, f"asked for {kind}" + ("" if ok else f" (needs ~{need}, over the {gb} budget)"))
    skipped = []
    if n <= exact_max:
        for k in EXACT_KINDS:
            ok, need = fits(k)
            if ok:
                why = f"{n:,} vectors <= {exact_max:,}: exact search"
                if skipped:
                    why += "; " + ", ".join(skipped)
                return plan(k, why + f" (~{need} with its build buffers, of the {gb} budget)")
            skipped.append(f"{k} needs ~{need}")
    else:
        skipped.append(f"{n:,} vectors > {exact_max:,}: IVF")
    for k in ("ivf-flat", "ivf-sq8"):
        ok, need = fits(k)
        if ok:
            return plan(k, "; ".join(skipped) + f"; {k} fits (~{need} with its build buffers, of the {gb} budget)")
        skipped.append(f"{k} needs ~{need}")
    ok, need = fits("ivf-pq")
    if not ok:  # not even the smallest codes: a clear error, not an index that is both worse and over the budget
        raise ValueError(
            f"no index fits a {gb} memory budget for {n:,} vectors of {dim} dimensions: ivf-pq with its smallest codes (1 "
            f"byte a vector) needs ~{need} with its build buffers ({'; '.join(skipped)}). Raise --budget-gb (default: half "
            f"the memory, {_gb(default_budget_bytes() / (1 << 30))}), or name a --type to build it over the budget")
    return plan("ivf-pq", "; ".join(skipped) + f"; ivf-pq with {_pq_params(dim, budget, n, ivf_nlist(n))[0]} bytes a vector"
                f" (~{need} with its build buffers, of the {gb} budget)")


def _gb(x: float) -> str:
    """A size given in gigabytes, for a reason or an error, with its unit and three significant
    digits: "0.418 GB", "11.8 GB", "1,230 GB"; below 0.01 GB in megabytes ("1.25 MB")."""
    if x >= 1000:
        return f"{x:,.0f} GB"
    return f"{x:.3g} GB" if x >= 0.01 else f"{x * 1024:.3g} MB"


# ------------------------------------------------------------------------------------------------
# Where vectors come from: a source yields (ids, vectors) chunks, each id once.


class VectorSource:
    """Vectors to index, streamed. Subclasses set ``count`` and ``dim``."""

    count: int
    dim: int

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32 [n, dim]) chunks covering every vector once."""
        raise NotImplementedError

    def sample(self, n_train: int, n_query: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(training vectors, query vectors, query ids or None when the queries are not indexed)."""
        raise NotImplementedError


def _sorted_unique(ids) -> np.ndarray:
    """``np.unique`` of int64 ids, without the sort when they already are (the usual case)."""
    a = np.asarray(ids, dtype=np.int64)
    if a.ndim == 1 and (len(a) < 2 or bool(np.all(a[1:] > a[:-1]))):
        return a
    return np.unique(a)


_isin_sorted = rf.isin_sorted  # (pipelines.prune uses it too)


def current_ids(ws: Workspace, checkpoint: str) -> np.ndarray:
    """Sorted image ids of the current catalog rows that have an embedding of ``checkpoint``."""
    from curator.query import connect

    con = connect(ws, sandbox=False)
    try:
        got = con.execute("SELECT image_id FROM embeddings WHERE checkpoint = ?", [checkpoint]).fetchnumpy()["image_id"]
    finally:
        con.close()
    return np.unique(np.asarray(got, dtype=np.int64))


def _row_groups_holding(pf, wanted: np.ndarray) -> list[int]:
    """Row groups of a Parquet file whose image_id range (from the footer's statistics) holds one
    of ``wanted`` (sorted): an update reads the few parts its new images are in, not every part's
    embeddings. Groups without statistics are kept."""
    md = pf.metadata
    col = next((j for j in range(md.num_columns) if md.schema.column(j).path == "image_id"), None)
    out = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics if col is not None else None
        if st is None or not st.has_min_max:
            out.append(g)
            continue
        at = int(np.searchsorted(wanted, int(st.min)))
        if at < len(wanted) and wanted[at] <= int(st.max):
            out.append(g)
    return out


class WorkspaceVectors(VectorSource):
    """One checkpoint's embeddings of the given image ids (default: the current catalog), read
    part by part from the workspace's Parquet files (first occurrence of an id wins)."""

    def __init__(self, ws: Workspace, checkpoint: str, ids: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS):
        self.ws = ws
        self.checkpoint = checkpoint
        self.ids = current_ids(ws, checkpoint) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
        self.count = len(self.ids)
        self.chunk_rows = chunk_rows
        self.dim = int(ws.manifest.get("checkpoints", {}).get(checkpoint, {}).get("embed_dim") or 0) or self._peek_dim()

    def _peek_dim(self) -> int:
        for _, vecs in self._batches(self.ids[:1] if len(self.ids) else self.ids):
            return vecs.shape[1]
        return 0

    def _batches(self, wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        seen = np.zeros(len(wanted), dtype=bool)
        left = len(wanted)
        for path in self.ws.part_paths("embeddings"):
            if left == 0:
                return
            pf = pq.ParquetFile(path)
            groups = _row_groups_holding(pf, wanted[~seen] if left < len(wanted) else wanted)
            if not groups:
                continue
            for batch in pf.iter_batches(batch_size=self.chunk_rows, row_groups=groups, columns=["image_id", "checkpoint", "embedding"]):
                mask = pc.equal(batch.column(1), pa.scalar(self.checkpoint))
                if not pc.any(mask).as_py():
                    continue
                batch = batch.filter(mask)
                ids = batch.column(0).to_numpy().astype(np.int64)
                pos = np.searchsorted(wanted, ids)
                ok = pos < len(wanted)
                ok[ok] = wanted[pos[ok]] == ids[ok]
                ok[ok] = ~seen[pos[ok]]
                if not ok.any():
                    continue
                rows = np.flatnonzero(ok)
                _, first = np.unique(pos[rows], return_index=True)  # an id twice in one batch: keep one
                rows = rows[first]
                emb = batch.column(2)
                lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
                d = int(lengths[rows[0]])
                if d == 0 or (lengths[rows] != d).any():
                    raise WorkspaceError(f"{path.name}: embeddings of checkpoint {self.checkpoint[:12]} have differing lengths")
                sub = emb.take(pa.array(rows))
                vecs = pc.list_flatten(sub).to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(rows), d)
                seen[pos[rows]] = True
                left -= len(rows)
                yield ids[rows], vecs

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from _rechunk(self._batches(self.ids), self.chunk_rows)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the given ids (sorted by id), read in one pass."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        got_ids, got = [], []
        for i, v in self._batches(wanted):
            got_ids.append(i)
            got.append(v)
        if not got:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        i, v = np.concatenate(got_ids), np.concatenate(got)
        order = np.argsort(i, kind="stable")
        return i[order], v[order]

    def sample(self, n_train, n_query, rng):
        n = self.count
        n_query = min(n_query, n)
        perm = rng.permutation(n)
        q_pos = perm[:n_query]
        rest = perm[n_query:]
        # training vectors are held apart from the queries unless that would halve them
        t_pos = rest[:n_train] if len(rest) >= n_train // 2 else perm[:n_train]
        ids, vecs = self.take(self.ids[np.union1d(q_pos, t_pos)])
        if len(ids) != len(np.union1d(q_pos, t_pos)):
            raise WorkspaceError(f"{self.ws.root}: some embeddings of checkpoint {self.checkpoint[:12]} could not be read; run `curator verify`")
        q_ids = np.sort(self.ids[q_pos])
        t_ids = self.ids[np.sort(t_pos)]
        queries = vecs[np.searchsorted(ids, q_ids)] if n_query else np.zeros((0, self.dim), np.float32)
        train = vecs[np.searchsorted(ids, t_ids)] if n_train else np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(train), np.ascontiguousarray(queries), q_ids


class ArrayVectors(VectorSource):
    """An in-memory (ids, vectors) pair as a source (tests, small jobs)."""

    def __init__(self, ids, vectors, chunk_rows: int = CHUNK_ROWS):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique")
        self.count, self.dim = self.vectors.shape
        self.chunk_rows = chunk_rows

    def chunks(self):
        for s in range(0, self.count, self.chunk_rows):
            yield self.ids[s:s + self.chunk_rows], self.vectors[s:s + self.chunk_rows]

    def sample(self, n_train, n_query, rng):
        n_query = min(n_query, self.count)
        perm = rng.permutation(self.count)
        q = np.sort(perm[:n_query])
        rest = perm[n_query:]
        t = np.sort(rest[:n_train] if len(rest) >= n_train // 2 else perm[:n_train])
        return self.vectors[t], self.vectors[q], self.ids[q]


def _rechunk(batches: Iterable[tuple[np.ndarray, np.ndarray]], rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Join small batches into chunks of about ``rows`` rows."""
    buf_i, buf_v, have = [], [], 0
    for ids, vecs in batches:
        buf_i.append(ids)
        buf_v.append(vecs)
        have += len(ids)
        if have >= rows:
            yield np.concatenate(buf_i), np.ascontiguousarray(np.concatenate(buf_v))
            buf_i, buf_v, have = [], [], 0
    if have:
        yield np.concatenate(buf_i), np.ascontiguousarray(np.concatenate(buf_v))


# ------------------------------------------------------------------------------------------------
# Exact top-k, k-means and list assignment in numpy (matrix products; FAISS GPU when present)


class ExactTopK:
    """Running exact top-k of fixed queries over streamed (ids, vectors) chunks (ground truth).

    ``restrict`` (sorted ids) keeps only those ids, for filtered ground truth.
    """

    def __init__(self, queries: np.ndarray, k: int, restrict: np.ndarray | None = None, block: int | None = None):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.restrict = restrict
        self.block = block or max(256, (16 << 20) // (4 * max(1, len(self.q))))
        self.sims = np.full((len(self.q), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(self.q), 0), np.int64)

    def __call__(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(self.q) == 0:
            return
        if self.restrict is not None:
            m = _isin_sorted(ids, self.restrict)
            ids, vecs = ids[m], vecs[m]
        for s in range(0, len(ids), self.block):
            bi = ids[s:s + self.block]
            sims = self.q @ vecs[s:s + self.block].T
            if sims.shape[1] > self.k:  # this block's own top k first: merging stays small
                top = np.argpartition(sims, sims.shape[1] - self.k, axis=1)[:, -self.k:]
                sims, bi = np.take_along_axis(sims, top, axis=1), bi[top]
            else:
                bi = np.broadcast_to(bi, sims.shape)
            allsims = np.concatenate([self.sims, sims], axis=1)
            allids = np.concatenate([self.ids, bi], axis=1)
            if allsims.shape[1] > self.k:
                top = np.argpartition(allsims, allsims.shape[1] - self.k, axis=1)[:, -self.k:]
                allsims = np.take_along_axis(allsims, top, axis=1)
                allids = np.take_along_axis(allids, top, axis=1)
            self.sims, self.ids = allsims, allids

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) sorted by decreasing similarity (ties: smaller id first)."""
        order = np.lexsort((self.ids, -self.sims), axis=1) if self.sims.size else np.zeros(self.sims.shape, np.int64)
        return np.take_along_axis(self.sims, order, axis=1), np.take_along_axis(self.ids, order, axis=1)


class _Assigner:
    """Nearest centroid (largest inner product) of each vector."""

    def __init__(self, centroids: np.ndarray, backend: str | None = None):
        self.c = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ct = np.ascontiguousarray(self.c.T)
        self.rows = max(256, (64 << 20) // (4 * len(self.c)))
        self.gpu_index = None
        self.torch_c = None
        if backend == "faiss":
            try:
                faiss = _faiss()
                self._res = faiss.StandardGpuResources()
                cpu = faiss.IndexFlatIP(self.c.shape[1])
                cpu.add(self.c)
                self.gpu_index = faiss.index_cpu_to_gpu(self._res, 0, cpu)
            except Exception as exc:  # noqa: BLE001 - untested without FAISS GPU: fall back to the CPU
                log.warning("FAISS GPU assignment unavailable (%s); using the CPU", exc)
                self.gpu_index = None
        elif backend == "torch":
            try:
                import torch

                self.torch_c = torch.from_numpy(self.c).to(_TORCH_DEVICE)
                self.torch_rows = max(1024, (512 << 20) // (4 * len(self.c)))
            except Exception as exc:  # noqa: BLE001 - a fallback path
                log.warning("torch GPU assignment unavailable (%s); using the CPU", exc)
                self.torch_c = None

    def __call__(self, x: np.ndarray, with_sims: bool = False):
        if self.gpu_index is not None:
            sims, labels = self.gpu_index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
            return (labels[:, 0].astype(np.int64), sims[:, 0]) if with_sims else labels[:, 0].astype(np.int64)
        if self.torch_c is not None:
            import torch

            out = np.empty(len(x), np.int64)
            best = np.empty(len(x), np.float32)
            with torch.no_grad():
                for s in range(0, len(x), self.torch_rows):
                    xt = torch.from_numpy(np.ascontiguousarray(x[s:s + self.torch_rows], dtype=np.float32)).to(self.torch_c.device)
                    b, a = (xt @ self.torch_c.T).max(dim=1)
                    out[s:s + len(a)] = a.cpu().numpy()
                    best[s:s + len(a)] = b.cpu().numpy()
            return (out, best) if with_sims else out
        out = np.empty(len(x), np.int64)
        best = np.empty(len(x), np.float32) if with_sims else None
        workers = _threads_for(len(x), self.rows)

        def block(s: int) -> None:
            scores = x[s:s + rows] @ self.ct
            a = np.argmax(scores, axis=1)
            out[s:s + rows] = a
            if with_sims:
                best[s:s + rows] = scores[np.arange(len(a)), a]

        if workers > 1:
            # one single-threaded product + argmax per worker: numpy's argmax runs on one core,
            # which left a multi-threaded product waiting on it
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import threadpool_limits

            rows = max(64, self.rows // 4)
            with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
                list(pool.map(block, range(0, len(x), rows)))
        else:
            rows = self.rows
            for s in range(0, len(x), rows):
                block(s)
        return (out, best) if with_sims else out


def _threads_for(n: int, rows: int) -> int:
    """Worker threads for ``n`` rows: FAISS's thread setting (what a benchmark limits), when
    threadpoolctl can keep BLAS to one thread in each."""
    threads = _faiss().omp_get_max_threads()
    if threads <= 1 or n < 2 * rows:
        return 1
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return 1
    return int(threads)


def spherical_kmeans(x: np.ndarray, k: int, niter: int = KMEANS_ITER, seed: int = 0, gpu: str | None = None) -> np.ndarray:
    """``k`` unit-norm centroids of the rows of ``x`` (k-means with the inner product)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k >= n:
        c = np.concatenate([x, x[np.arange(k - n) % n]]) if k > n else x.copy()
        return _normalise(c)
    if gpu == "faiss":
        try:
            faiss = _faiss()
            km = faiss.Kmeans(d, k, niter=niter, spherical=True, seed=seed, gpu=True, verbose=False)
            km.train(x)
            return _normalise(np.asarray(km.centroids, dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - untested without a GPU: fall back to numpy
            log.warning("FAISS GPU k-means unavailable (%s); using the CPU", exc)
    rng = np.random.default_rng(seed)
    c = _normalise(x[rng.choice(n, k, replace=False)].copy())
    block = max(1024, (64 << 20) // (4 * k))
    for _ in range(niter):
        assign, best = _Assigner(c, gpu if gpu == "torch" else None)(x, with_sims=True)
        sums = np.zeros((k, d), np.float64)
        for s in range(0, n, block):
            a = assign[s:s + block]
            order = np.argsort(a, kind="stable")
            labels, starts = np.unique(a[order], return_index=True)
            sums[labels] += np.add.reduceat(x[s:s + block][order], starts, axis=0)
        counts = np.bincount(assign, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed empty clusters with the points furthest from their centroid
            far = np.argsort(best, kind="stable")[: len(empty)]
            sums[empty] = x[far]
        c = _normalise(sums.astype(np.float32))
    return c


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return np.ascontiguousarray(x / norms, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Building


@dataclass
class BuildReport:
    plan: IndexPlan
    nprobe: int = 0
    recall_at_10: float | None = None
    recall_queries: int = 0
    tune_curve: list = dataclasses.field(default_factory=list)
    recall_at_10_text: float | None = None  # on held-out text queries (build_from_source's text_queries)
    recall_queries_text: int = 0
    nprobe_text: int = 0  # IVF: nprobe for text queries (0: none tuned; use nprobe)
    tune_curve_text: list = dataclasses.field(default_factory=list)
    train_s: float = 0.0
    add_s: float = 0.0
    tune_s: float = 0.0
    build_s: float = 0.0
    gpu: str | None = None  # backend of the k-means and assignment ("faiss", "torch") or None
    radii: np.ndarray | None = None
    refine: rf.RefineStore | None = None  # attached to the index too (see attach_refine)


def _exact_base(kind: str, d: int):
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    qt = faiss.ScalarQuantizer.QT_fp16 if kind == "fp16" else faiss.ScalarQuantizer.QT_8bit
    return faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT)


def _sq8_ranges(sq) -> None:
    """IVF-SQ8: 8-bit codes of the residuals over each dimension's min..max in the training
    residuals (FAISS's default, what ``IndexIVF.train`` would give). Mean +- 3 standard deviations
    was used while the encoder was (wrongly) trained on the raw vectors, where it helped; on the
    residuals it clips too much: recall@10 on `curator bench index` vectors (200k, 512-d) 0.953
    with min..max, 0.949 with mean +- 4 sd, 0.910 with mean +- 3 sd (0.976 / 0.978 / 0.949 on
    zero-mean vectors)."""
    faiss = _faiss()
    sq.rangestat = faiss.ScalarQuantizer.RS_minmax
    sq.rangestat_arg = 0.0


def _empty_exact(plan: IndexPlan, train: np.ndarray):
    base = _exact_base(plan.kind, plan.dim)
    if not base.is_trained:
        base.train(np.ascontiguousarray(train, dtype=np.float32))
    return _faiss().IndexIDMap2(base)


def _empty_ivf(plan: IndexPlan, train: np.ndarray, seed: int, gpu: str | None):
    """An IVF index with trained centroids and encoder, no vectors."""
    faiss = _faiss()
    d, nlist = plan.dim, plan.nlist
    centroids = spherical_kmeans(train, nlist, seed=seed, gpu=gpu)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    if plan.kind == "ivf-flat":
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    elif plan.kind == "ivf-sq8":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, True)
        _sq8_ranges(ivf.sq)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, plan.pq_m, plan.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.pq.cp.niter = 15
        ivf.pq.cp.max_points_per_centroid = 64  # 16k training points a sub-quantiser is plenty
    if plan.kind != "ivf-flat":
        enc = train[np.random.default_rng(seed + 1).permutation(len(train))[:65_536]] if len(train) > 65_536 else train
        enc = np.ascontiguousarray(enc, dtype=np.float32)
        assign = _Assigner(centroids, gpu)(enc)
        if ivf.by_residual:
            # the codes stand for x - centroid[list], so the encoder learns from those residuals
            # (as FAISS's IndexIVF.train does); on embeddings that share a direction the raw
            # vectors' ranges / codebooks are far coarser than their residuals
            enc = np.ascontiguousarray(enc - centroids[assign], dtype=np.float32)
        ivf.train_encoder(len(enc), faiss.swig_ptr(enc), faiss.swig_ptr(assign))
    ivf.is_trained = True
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    ivf.nprobe = max(1, min(nlist, 16))
    _stash(ivf, "_curator_centroids", centroids)
    return ivf


class _Scratch:
    """Encoded (list, id, code) records written to temporary files, read back in blocks."""

    def __init__(self, folder: Path | None, code_size: int):
        folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        stem = f".scratch-{uuid.uuid4().hex[:12]}"
        self.paths = [folder / f"{stem}-{p}.tmp" for p in ("lists", "ids", "codes")]
        self.files = [open(p, "wb+") for p in self.paths]  # noqa: SIM115 - closed (and removed) by close()
        self.code_size = code_size
        self.rows = 0

    def write(self, lists: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
        for f, a in zip(self.files, (lists.astype(np.int32), ids.astype(np.int64), codes)):
            f.write(np.ascontiguousarray(a).tobytes())
        self.rows += len(ids)

    def blocks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for f in self.files:
            f.flush()
            f.seek(0)
        for s in range(0, self.rows, rows):
            m = min(rows, self.rows - s)
            lists = np.fromfile(self.files[0], np.int32, m).astype(np.int64)
            ids = np.fromfile(self.files[1], np.int64, m)
            codes = np.fromfile(self.files[2], np.uint8, m * self.code_size).reshape(m, self.code_size)
            yield lists, ids, codes

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                f.close()
        for p in self.paths:
            with contextlib.suppress(OSError):
                p.unlink()


def _centroids(ivf) -> np.ndarray:
    c = getattr(ivf, "_curator_centroids", None)
    if c is None:
        c = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)
        _stash(ivf, "_curator_centroids", c)
    return c


def _residual_norms(ivf, lists: np.ndarray, codes: np.ndarray, x: np.ndarray | None = None):
    """|x^ - c_list| of the vectors x^ the codes stand for (what the index scores with); with
    vectors ``x`` (the float16 copies), also returns each |x - x^| (the codes' errors)."""
    faiss = _faiss()
    codes = np.ascontiguousarray(codes)
    out = np.empty((len(codes), ivf.d), np.float32)
    ivf.decode_vectors(len(codes), faiss.swig_ptr(codes), faiss.swig_ptr(np.ascontiguousarray(lists, dtype=np.int64)), faiss.swig_ptr(out))
    err = None
    if x is not None:
        err = np.linalg.norm(out - x, axis=1)
    out -= _centroids(ivf)[lists]
    norms = np.linalg.norm(out, axis=1)
    return norms if x is None else (norms, err)


def _list_sizes(invlists, nlist: int) -> np.ndarray:
    return np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)


def _encode_ivf(ivf, chunks: Iterable[tuple[np.ndarray, np.ndarray]], assigner: _Assigner, scratch: _Scratch,
                observers: list[Callable], radii: np.ndarray, errors: np.ndarray | None = None) -> np.ndarray:
    """Assign and encode every chunk into ``scratch``, raising ``radii`` (per list, the largest
    |x^ - centroid|) to cover the new codes, and ``errors`` when given (per list, the largest
    distance between a code and its vector's float16 copy, |x16 - x^|). Returns the number of new
    vectors per list."""
    faiss = _faiss()
    sizes = np.zeros(ivf.nlist, np.int64)
    for ids, x in chunks:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for obs in observers:
            obs(ids, x)
        a = assigner(x)
        codes = np.empty((len(x), ivf.code_size), np.uint8)
        ivf.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(a), faiss.swig_ptr(codes), False)
        scratch.write(a, ids, codes)
        sizes += np.bincount(a, minlength=ivf.nlist)
        for s in range(0, len(x), CHUNK_ROWS):
            sl = slice(s, s + CHUNK_ROWS)
            if errors is not None:
                norms, e = _residual_norms(ivf, a[sl], codes[sl], _half(x[sl]))
                np.maximum.at(errors, a[sl], e.astype(np.float32))
            else:
                norms = _residual_norms(ivf, a[sl], codes[sl])
            np.maximum.at(radii, a[sl], norms)
    return sizes


def _fill_ivf(ivf, new_sizes: np.ndarray, scratch: _Scratch, drop: np.ndarray | None = None) -> None:
    """Give ``ivf`` lists of exactly their final size: its current entries (e.g. a memory-mapped
    old index) less the ids in ``drop`` (sorted) first, then the scratch records."""
    faiss = _faiss()
    nlist, cs = ivf.nlist, ivf.code_size
    old = ivf.invlists
    old_sizes = _list_sizes(old, nlist)
    base_sizes = np.zeros(nlist, np.int64)
    il = faiss.ArrayInvertedLists(nlist, cs)
    for lst in np.flatnonzero(old_sizes + new_sizes).tolist():
        n = int(old_sizes[lst])
        if n == 0:
            il.resize(lst, int(new_sizes[lst]))  # from empty: exactly this size, no doubling
            continue
        ids_p, codes_p = old.get_ids(lst), old.get_codes(lst)
        try:
            keep = None
            if drop is not None and len(drop):
                keep = ~_isin_sorted(faiss.rev_swig_ptr(ids_p, n), drop)
                if keep.all():
                    keep = None
            m = n if keep is None else int(keep.sum())
            il.resize(lst, m + int(new_sizes[lst]))
            if keep is None:
                il.update_entries(lst, 0, n, ids_p, codes_p)
            elif m:
                ids = np.ascontiguousarray(faiss.rev_swig_ptr(ids_p, n)[keep])
                codes = np.ascontiguousarray(faiss.rev_swig_ptr(codes_p, n * cs).reshape(n, cs)[keep])
                il.update_entries(lst, 0, m, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        finally:
            old.release_ids(lst, ids_p)
            old.release_codes(lst, codes_p)
        base_sizes[lst] = m
    total = base_sizes + new_sizes
    fill = base_sizes.copy()
    # big blocks: each touches most lists, and every (block, list) pair is one call
    for lists, ids, codes in scratch.blocks(max(CHUNK_ROWS, min(FILL_ROWS, (128 << 20) // max(1, cs)))):
        order = np.argsort(lists, kind="stable")
        lists, ids, codes = lists[order], np.ascontiguousarray(ids[order]), np.ascontiguousarray(codes[order])
        labels, starts, counts = np.unique(lists, return_index=True, return_counts=True)
        for lst, s, c in zip(labels.tolist(), starts.tolist(), counts.tolist()):
            il.update_entries(lst, int(fill[lst]), c, faiss.swig_ptr(ids[s:s + c]), faiss.swig_ptr(codes[s:s + c]))
            fill[lst] += c
    if not np.array_equal(fill, total):
        raise RuntimeError("internal error: inverted lists not filled as counted")
    ivf.replace_invlists(il, True)
    il.this.disown()  # owned by the index now
    ivf.ntotal = int(total.sum())
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def _half(x: np.ndarray) -> np.ndarray:
    """The float16 copies of ``x`` (curator.refine), as float32."""
    return x.astype(np.float16).astype(np.float32)


def _fill_exact(index, total: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]], observers: list[Callable], copy_from=None,
                measure_error: bool = False, drop: np.ndarray | None = None):
    """Fill an empty IndexIDMap2 over flat codes with ``total`` vectors, storage allocated once:
    ``copy_from`` (an IndexIDMap2 of the same kind) less the ids in ``drop`` (sorted) first, then
    the chunks. Returns, with ``measure_error``, the new codes' largest distance to the float16
    copies max |x16 - x^| (else 0)."""
    faiss = _faiss()
    base = faiss.downcast_index(index.index)
    cs = base.code_size
    old_n = 0 if copy_from is None else int(copy_from.ntotal)
    base.codes.resize(total * cs)
    index.id_map.resize(total)
    codes = faiss.rev_swig_ptr(base.codes.data(), total * cs) if total else np.zeros(0, np.uint8)
    idmap = faiss.rev_swig_ptr(index.id_map.data(), total) if total else np.zeros(0, np.int64)
    at = 0
    if old_n:
        old_codes = faiss.rev_swig_ptr(faiss.downcast_index(copy_from.index).codes.data(), old_n * cs).reshape(old_n, cs)
        old_ids = faiss.rev_swig_ptr(copy_from.id_map.data(), old_n)
        for s in range(0, old_n, FILL_ROWS):
            ids_b = old_ids[s:s + FILL_ROWS]
            keep = slice(None) if drop is None or not len(drop) else ~_isin_sorted(ids_b, drop)
            ids_b = ids_b[keep]
            m = len(ids_b)
            if at + m > total:
                raise RuntimeError("internal error: more vectors than counted")
            codes[at * cs:(at + m) * cs] = old_codes[s:s + FILL_ROWS][keep].reshape(-1)
            idmap[at:at + m] = ids_b
            at += m
    err = 0.0
    for ids, x in chunks:
        x = np.ascontiguousarray(x, dtype=np.float32)
        for obs in observers:
            obs(ids, x)
        m = len(ids)
        if at + m > total:
            raise RuntimeError("internal error: more vectors than counted")
        c = base.sa_encode(x)
        codes[at * cs:(at + m) * cs] = c.reshape(-1)
        if measure_error and m:
            err = max(err, float(np.linalg.norm(base.sa_decode(c) - _half(x), axis=1).max()))
        idmap[at:at + m] = ids
        at += m
    if at != total:
        raise RuntimeError(f"internal error: {at} vectors read, {total} expected")
    base.ntotal = total
    index.ntotal = total
    index.construct_rev_map()
    return err


def _search_ids(index, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
    """Top-k ids as searches see them (re-ranked when the index has a refine store)."""
    faiss = _faiss()
    store = refine_of(index)
    kk = k if store is None else rf.candidates(k, index.ntotal)
    if nprobe is None:
        sims, ids = index.search(queries, kk)
    else:
        sims, ids = index.search(queries, kk, params=faiss.SearchParametersIVF(nprobe=int(nprobe)))
    return ids if store is None else store.rescore(queries, ids, sims, k)[1]


def query_recalls(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K, self_ids: np.ndarray | None = None) -> np.ndarray:
    """Each query's share of its exact top-k (``truth``) that ``found`` holds in its top-k.

    With ``self_ids`` (queries that are indexed vectors) the query's own id is left out of both;
    a query left with no true neighbour has no entry.
    """
    scores = []
    for i in range(len(truth)):
        t, f = truth[i], found[i]
        f = f[f >= 0]
        if self_ids is not None:
            t, f = t[t != self_ids[i]], f[f != self_ids[i]]
        t, f = t[:k], f[:k]
        if len(t):
            scores.append(len(np.intersect1d(t, f)) / len(t))
    return np.asarray(scores, dtype=np.float64)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K, self_ids: np.ndarray | None = None) -> float | None:
    """Mean of :func:`query_recalls` (None without queries)."""
    scores = query_recalls(found, truth, k, self_ids)
    return float(scores.mean()) if len(scores) else None


# what the tuned nprobe's mean recall must clear the target by, at least and at most
TUNE_MARGIN = 0.01
TUNE_MARGIN_MAX = 0.03


def tune_margin(scores: np.ndarray, groups: np.ndarray | None = None) -> float:
    """The margin a sample of per-query recalls must clear the target by: :data:`TUNE_MARGIN`,
    or two standard errors of their mean when the queries disagree more (a few dozen text
    queries, some of whose neighbours lie in lists far from the query, spread widely; 500 image
    queries hardly ever need more than 0.01). ``groups`` (one label per score: a phrase, whose
    plain and contrasted queries fare alike) makes the groups' means the sample. At most
    :data:`TUNE_MARGIN_MAX`, so that a handful of phrases that disagree does not demand every
    list."""
    scores = np.asarray(scores, dtype=np.float64)
    if groups is not None:
        if len(groups) != len(scores):
            raise ValueError(f"{len(groups)} groups for {len(scores)} recalls")
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        scores = np.bincount(inverse, weights=scores) / np.bincount(inverse)
    if len(scores) < 2:
        return TUNE_MARGIN
    return min(TUNE_MARGIN_MAX, max(TUNE_MARGIN, 2.0 * float(np.std(scores, ddof=1)) / math.sqrt(len(scores))))


def _tune_nprobe(index, queries, truth, self_ids, target: float, groups: np.ndarray | None = None) -> tuple[int, list]:
    """Smallest power-of-two nprobe whose mean recall@10 on the queries clears ``target`` by
    :func:`tune_margin` (to spare: held-out queries do a little worse than those it was tuned
    on); if none does, the smallest that reaches ``target``; if none does, the smallest that gets
    within 0.002 of the best. The curve is a list of (nprobe, mean recall, margin). ``groups``:
    see :func:`tune_margin`."""
    nlist = index.nlist
    cands = sorted({min(nlist, 1 << i) for i in range(31) if (1 << i) < 2 * nlist})
    curve: list[tuple[int, float, float]] = []
    for p in cands:
        scores = query_recalls(_search_ids(index, queries, RECALL_K + 1, p), truth, RECALL_K, self_ids)
        r = float(scores.mean()) if len(scores) else 0.0
        margin = tune_margin(scores, groups)
        curve.append((p, r, round(margin, 4)))
        if r >= min(1.0, target + margin):
            break
        if len(curve) >= 3 and r - curve[-3][1] < 0.002 and p >= 8:
            break  # plateau: more probes no longer help (the codes, not the probes, limit recall)
    ok = [p for p, r, m in curve if r >= min(1.0, target + m)] or [p for p, r, _ in curve if r >= target]
    if ok:
        return ok[0], curve
    best = max(r for _, r, _ in curve)
    return next(p for p, r, _ in curve if r >= best - 0.002), curve


def build_from_source(source: VectorSource, plan: IndexPlan, *, recall_sample: int = RECALL_SAMPLE, seed: int = 0,
                      gpu: bool | str | None = None, on_chunk: list[Callable] | None = None, scratch_dir: Path | None = None,
                      target_recall: float = TARGET_RECALL, refine_dir: Path | None = None, refine_prefix: str = "refine",
                      text_queries: np.ndarray | None = None, text_groups: np.ndarray | None = None):
    """Build the planned index from ``source`` (streamed) and measure its recall@10.

    ``text_queries`` (unit vectors from the text tower: curator.query_sample): two thirds tune
    an IVF index's ``nprobe_text`` (each third its own; the larger is kept. Text queries lie apart
    from the images, and an index tuned on image queries alone can miss their neighbours;
    searches by text use it, searches by image keep ``nprobe``, and never probe fewer), the last
    third measures ``recall_at_10_text`` with it. ``text_groups`` (one label per text query, e.g.
    its phrase) keeps a group in one part.

    Returns ``(index, BuildReport)``. ``on_chunk`` callables see every (ids, vectors) chunk once,
    as it is added (benchmarks compute their own ground truth there). A plan with ``refine``
    writes its float16 copies as a segment ``refine_dir/<refine_prefix>-<random>`` (in memory
    without ``refine_dir``) and attaches the store to the index; nprobe is tuned, and recall
    measured, on the re-ranked results.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    rep = BuildReport(plan=plan, gpu=gpu_backend(gpu) if plan.is_ivf else None)
    n_query = min(recall_sample, source.count) if recall_sample > 0 else 0
    train, queries, q_ids = source.sample(plan.train_size, n_query, rng)
    log.info("index build: %s (%s) over %d vectors; %d training vectors, %d recall queries sampled in %.1f s",
             plan.kind, plan.describe(), source.count, len(train), len(queries), time.perf_counter() - t0)
    truth = ExactTopK(queries, RECALL_K + 1)
    tq, tq_groups, tq_parts = None, None, (0, 0)
    if text_queries is not None and len(text_queries):
        # two tuning parts and a held-out part, drawn by group (a phrase's plain and contrast
        # vectors stay together); with fewer than three groups, one tuning part
        groups = np.arange(len(text_queries)) if text_groups is None else np.asarray(text_groups)
        names = rng.permutation(np.unique(groups))
        g = len(names)
        cuts = (g // 3, 2 * g // 3) if g >= 3 else (g // 2, g // 2)
        part = np.where(np.isin(groups, names[: cuts[0]]), 0, np.where(np.isin(groups, names[cuts[0]: cuts[1]]), 1, 2))
        order = np.concatenate([np.flatnonzero(part == j) for j in range(3)])
        tq = np.ascontiguousarray(np.asarray(text_queries, np.float32)[order])
        tq_parts = (int((part == 0).sum()), int((part <= 1).sum()))  # ends of the two tuning parts
        tq_groups = groups[order]
    truth_t = ExactTopK(tq, RECALL_K) if tq is not None else None
    observers = [truth, *([truth_t] if truth_t is not None else []), *(on_chunk or [])]
    writer = rf.SegmentWriter(source.count, source.dim, refine_dir, refine_prefix) if plan.refine else None
    if writer is not None:
        observers.append(writer)
    t1 = time.perf_counter()
    try:
        if plan.is_ivf:
            index = _empty_ivf(plan, train, seed, rep.gpu)
            del train
            rep.train_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            scratch = _Scratch(scratch_dir, index.code_size)
            rep.radii = np.zeros(index.nlist, np.float32)
            errors = np.zeros(index.nlist, np.float32) if writer is not None else None
            try:
                sizes = _encode_ivf(index, source.chunks(), _Assigner(_centroids(index), rep.gpu), scratch, observers, rep.radii, errors)
                _fill_ivf(index, sizes, scratch)
            finally:
                scratch.close()
        else:
            index = _empty_exact(plan, train)
            del train
            rep.train_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            err = _fill_exact(index, source.count, source.chunks(), observers, measure_error=writer is not None)
        if writer is not None:
            if plan.is_ivf:
                rep.refine = rf.RefineStore([writer.finish()], float(errors.max(initial=0.0)), errors)
            else:
                rep.refine = rf.RefineStore([writer.finish()], err)
            attach_refine(index, rep.refine)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    rep.add_s = time.perf_counter() - t2
    log.info("index build: trained in %.1f s, vectors added in %.1f s", rep.train_s, rep.add_s)
    t3 = time.perf_counter()
    _, gt = truth.result()
    gt_t = truth_t.result()[1] if truth_t is not None else None
    ev_t = slice(0, 0 if tq is None else len(tq))
    if plan.is_ivf:
        half = n_query // 2
        if half >= 1:
            rep.nprobe, rep.tune_curve = _tune_nprobe(index, queries[:half], gt[:half], None if q_ids is None else q_ids[:half], target_recall)
            ev = slice(half, n_query)
        else:
            rep.nprobe = max(1, min(index.nlist, 16))
            ev = slice(0, n_query)
        if tq is not None and 1 <= tq_parts[1] < len(tq):
            # Each of two parts of the phrases tunes an nprobe, and the larger is kept: a few dozen
            # text queries vary so much from phrase to phrase that one part can clear the target
            # with lists another finds too few (10M vectors: 0.969 against 0.925). The third part,
            # used by neither, measures the recall at the nprobe kept (never fewer than an image
            # search's).
            parts = [h for h in (slice(0, tq_parts[0]), slice(tq_parts[0], tq_parts[1])) if h.stop > h.start]
            tuned = [_tune_nprobe(index, tq[h], gt_t[h], None, target_recall, tq_groups[h]) for h in parts]
            setter = max(range(len(tuned)), key=lambda j: tuned[j][0])
            rep.nprobe_text = max(tuned[setter][0], rep.nprobe)
            rep.tune_curve_text = tuned[setter][1]
            ev_t = slice(tq_parts[1], len(tq))
        index.nprobe = rep.nprobe
    else:
        ev = slice(0, n_query)
    if n_query and ev.stop > ev.start:
        found = _search_ids(index, queries[ev], RECALL_K + 1)
        rep.recall_at_10 = recall_at_k(found, gt[ev], RECALL_K, q_ids[ev] if q_ids is not None else None)
        rep.recall_queries = ev.stop - ev.start
    if tq is not None and ev_t.stop > ev_t.start:
        rep.recall_at_10_text = recall_at_k(_search_ids(index, tq[ev_t], RECALL_K, rep.nprobe_text or None), gt_t[ev_t], RECALL_K)
        rep.recall_queries_text = ev_t.stop - ev_t.start
    rep.tune_s = time.perf_counter() - t3
    rep.build_s = time.perf_counter() - t0
    log.info("index build: nprobe %d, recall@10 %s on %d queries (tuning %.1f s; nprobe, recall, margin: %s)%s", rep.nprobe,
             "n/a" if rep.recall_at_10 is None else f"{rep.recall_at_10:.4f}", rep.recall_queries, rep.tune_s, rep.tune_curve,
             "" if rep.recall_at_10_text is None else f"; text queries: nprobe {rep.nprobe_text}, recall@10 "
             f"{rep.recall_at_10_text:.4f} on {rep.recall_queries_text} (nprobe, recall, margin: {rep.tune_curve_text})")
    return index, rep


# ------------------------------------------------------------------------------------------------
# The workspace's index: build, append, save, load


@dataclass
class IndexInfo:
    checkpoint: str
    count: int
    dim: int
    index_type: str  # one of KINDS
    built_at: str  # when this file was written (a build or an append)
    generation: int
    file: str
    trained_at: str | None = None  # when the index was last built from scratch
    description: str = ""  # FAISS-style, e.g. "IVF4000,SQ8"
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    recall_at_10: float | None = None
    recall_queries: int = 0
    # ... on held-out text queries (curator.query_sample); None: not measured (no checkpoint file)
    recall_at_10_text: float | None = None
    recall_queries_text: int = 0
    nprobe_text: int = 0  # IVF: nprobe for searches by text (0: none tuned, they use nprobe)
    recall_count: int = 0  # vectors in the index when the recall was measured
    built_count: int = 0  # vectors the index was built (trained) with
    requested: str = "auto"
    budget_gb: float | None = None
    est_gb: float = 0.0
    reason: str = ""
    build_s: float = 0.0
    gpu: str | None = None  # GPU backend of the build's k-means and assignment, if any
    appended_at: str | None = None
    radii_file: str | None = None
    # index_source_key() of the workspace state whose images the index holds (None: written
    # before keys were kept; staleness is then decided by comparing the ids)
    source_key: str | None = None
    refine: bool = True  # asked for (False: `curator index --no-refine`)
    # segments of float16 copies its searches re-rank from (curator.refine), relative to the
    # workspace; None: the index has none
    refine_files: list[str] | None = None
    refine_error: float = 0.0  # the codes' largest error max |x - x^| (range searches use it)


# datasets whose part lists decide which images an index should hold
_SOURCE_DATASETS = ("catalog", "superseded", "embeddings")


def index_source_key(ws: Workspace) -> str:
    """A fingerprint of the images an index of ``ws`` should hold: a hash of the catalog,
    superseded and embeddings part lists as the manifest lists them.

    Parts are immutable and only ``embed`` adds (and nothing removes) parts of these datasets,
    so the key changes exactly when images come or go, including when a changed file adds one
    row and supersedes another (the count stays, the ids do not). It reads no data: cheap at
    any size.
    """
    parts = {d: sorted(e["file"] for e in ws.manifest.get("parts", {}).get(d, [])) for d in _SOURCE_DATASETS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _resolve_checkpoint(ws: Workspace, checkpoint: str | None) -> str:
    ensemble = ws.manifest.get("ensemble") or []
    if not ensemble:
        raise WorkspaceError(f"{ws.root}: nothing embedded yet; run `curator embed` first")
    checkpoint = checkpoint or ensemble[0]
    matches = [s for s in ensemble if s.startswith(checkpoint)]
    if len(matches) != 1:
        raise WorkspaceError(f"checkpoint {checkpoint!r} is not one of the workspace's: {', '.join(s[:12] for s in ensemble)}")
    return matches[0]


def build_index(ws: Workspace, checkpoint: str | None = None, *, budget_gb: float | None = None, kind: str = "auto",
                recall_sample: int = RECALL_SAMPLE, seed: int = 0, gpu: bool | str | None = None, exact_max: int | None = None,
                refine: bool = True) -> IndexInfo:
    """Build the workspace's index from scratch (needs the writer lock). ``refine=False``: no
    float16 copies for re-ranking (less disk, lower recall for 8-bit and PQ codes)."""
    checkpoint = _resolve_checkpoint(ws, checkpoint)
    key = index_source_key(ws)  # of the state read below (the lock keeps it)
    with contextlib.suppress(Exception):  # (an unreadable index.json: the build replaces it)
        _remove_unnamed(ws, read_index_info(ws))  # what a killed build left, before writing more
    source = WorkspaceVectors(ws, checkpoint)
    if source.count == 0:
        raise WorkspaceError(f"{ws.root}: no embeddings to index yet")
    plan = choose_index(source.count, source.dim, budget_gb, kind, exact_max, refine=refine)
    log.debug("index: %s (%s): %s", plan.kind, plan.describe(), plan.reason)
    texts = groups = None
    if recall_sample > 0:
        from curator.query_sample import text_queries

        got = text_queries(ws, checkpoint)
        if got is not None and got[0].shape[1] != source.dim:
            log.warning("text queries of %d dimensions for an index of %d: not used", got[0].shape[1], source.dim)
            got = None
        texts, groups = got if got is not None else (None, None)
    index, rep = build_from_source(source, plan, recall_sample=recall_sample, seed=seed, gpu=gpu, scratch_dir=_index_dir(ws),
                                   refine_dir=_index_dir(ws), refine_prefix=f"{checkpoint[:12]}.refine", text_queries=texts,
                                   text_groups=groups)
    info = IndexInfo(
        checkpoint=checkpoint, count=int(index.ntotal), dim=source.dim, index_type=plan.kind, built_at="", generation=0, file="",
        description=plan.describe(), nlist=plan.nlist, nprobe=rep.nprobe, pq_m=plan.pq_m, pq_nbits=plan.pq_nbits if plan.kind == "ivf-pq" else 0,
        recall_at_10=rep.recall_at_10, recall_queries=rep.recall_queries, recall_count=int(index.ntotal), built_count=int(index.ntotal),
        recall_at_10_text=rep.recall_at_10_text, recall_queries_text=rep.recall_queries_text, nprobe_text=rep.nprobe_text,
        requested=kind, budget_gb=budget_gb, est_gb=round(plan.est_bytes / (1 << 30), 3), reason=plan.reason,
        build_s=round(rep.build_s, 2), gpu=rep.gpu, source_key=key, refine=bool(refine),
    )
    return _save(ws, index, info, rep.radii)


def rebuild_index(ws: Workspace, info: IndexInfo) -> IndexInfo:
    """Build again with the settings an earlier build was asked for."""
    return build_index(ws, info.checkpoint, budget_gb=info.budget_gb, kind=info.requested or "auto", refine=info.refine)


# An IVF index whose images grew past this factor of those its lists were trained on is noted (the
# recall measured at the build may not hold for the new images; past 4x it is rebuilt).
APPENDED_NOTE_FACTOR = 1.25


def recall_note(info: IndexInfo, workspace: str | Path = "W") -> str | None:
    """A sentence when an IVF index holds many more images than its lists were trained on (their
    recall was not measured); None otherwise."""
    if info.index_type not in IVF_KINDS or not info.built_count or info.count <= APPENDED_NOTE_FACTOR * info.built_count:
        return None
    measured = "" if info.recall_at_10 is None else f" the recall@10 of {info.recall_at_10:.3f} measured then may not hold for them;"
    return (f"{info.count - info.built_count:,} of its {info.count:,} images were appended after its lists were trained on "
            f"{info.built_count:,}:{measured} `curator index --workspace {workspace}` trains and measures again")


def _needs_rebuild(info: IndexInfo, n: int) -> str | None:
    if info.requested in (None, "", "auto"):
        try:
            plan = choose_index(n, info.dim, info.budget_gb, "auto")
        except ValueError as exc:  # the budget holds no index any more: keep this one (appended to) and say so
            log.warning("%s; the index stays %s", exc, info.index_type)
            plan = None
        if plan is not None and plan.kind != info.index_type:
            return f"at {n:,} vectors the index to use is {plan.kind}, not {info.index_type}"
    if info.index_type in IVF_KINDS and info.built_count and n > 4 * info.built_count:
        return f"the IVF lists were trained on {info.built_count:,} vectors and would hold {n:,}"
    return None


def sync_index(ws: Workspace, max_rebuild: int | None = None) -> IndexInfo | None:
    """Bring an existing index up to date with the catalog: append new images and remove those
    that left it (changed files, ``embed --prune``), in one pass that copies the other codes as
    they are (no retraining, no re-encoding); rebuild when more than :data:`REMOVE_MAX` of its
    images left, the chosen type changes with the size, or an IVF index outgrew its training.
    Returns None when the workspace has no index. Needs the lock.

    Quick when nothing changed: an index whose recorded :func:`index_source_key` is the
    workspace's is current without reading its ids. ``max_rebuild``: rebuild only up to this many
    images; beyond it a needed rebuild is skipped with a warning and the stale index is left (its
    searches say so) for ``curator index`` or the next ``embed``.
    """
    info = read_index_info(ws)
    if info is None:
        return None
    key = index_source_key(ws)  # of the state read below (the lock keeps it)
    if info.source_key == key and (ws.root / info.file).is_file():
        return info

    def rebuild(why: str, n: int) -> IndexInfo | None:
        """The rebuilt index's info; the old info when the rebuild is put off (``max_rebuild``);
        None when its --budget-gb holds no index at this size (the caller decides)."""
        if max_rebuild is not None and n > max_rebuild:
            log.warning("the index is out of date (%s) and rebuilding its %d images takes a while: not now; "
                        "run `curator index --workspace %s` (or the next `curator embed` does it)", why, n, ws.root)
            return info
        log.info("rebuilding the index: %s", why)
        try:
            return rebuild_index(ws, info)
        except ValueError as exc:
            log.warning("the index cannot be rebuilt as it was asked for (%s): %s", why, exc)
            return None

    try:
        old, info = load_index(ws, mmap=True)
        have = np.sort(index_ids(old))
    except Exception as exc:  # noqa: BLE001 - a fallback path
        log.info("index unreadable (%s): rebuilding", exc)
        return rebuild(f"unreadable: {exc}", info.count) or info  # (nothing to update in place: it stays stale)
    if len(have) > 1 and bool(np.any(have[1:] == have[:-1])):
        del old
        return rebuild("it holds an image twice", info.count) or info
    ids = current_ids(ws, info.checkpoint)
    gone = have[~_isin_sorted(have, ids)]  # changed, retired (--prune) or dropped from the catalog
    new = ids[~_isin_sorted(ids, have)]
    if len(new) == 0 and len(gone) == 0:
        if info.source_key != key:  # current, but recorded under another key (or none): record this one
            info.source_key = key
            _write_info(ws, info)
        return info
    if len(gone) > REMOVE_MAX * len(have):
        reason = f"{len(gone):,} of its {len(have):,} images are no longer current"
    else:
        reason = _needs_rebuild(info, len(ids))
    if reason:
        del old
        done = rebuild(reason, len(ids))
        if done is not None:
            return done
        log.warning("updating the index in place instead: %d images added, %d removed, no retraining", len(new), len(gone))
        old, info = load_index(ws, mmap=True)
    if len(gone):
        log.info("updating the index: removing %d images that are no longer current, adding %d", len(gone), len(new))
    source = WorkspaceVectors(ws, info.checkpoint, new) if len(new) else None
    chunks = source.chunks() if source is not None else iter(())
    faiss = _faiss()
    radii = None
    prefix = f"{info.checkpoint[:12]}.refine"
    store = refine_of(old)  # the new images' float16 copies go to a segment of their own
    writer = rf.SegmentWriter(source.count, source.dim, _index_dir(ws), prefix) if store is not None and source is not None else None
    observers = [writer] if writer is not None else []
    errors = None
    kept = None
    try:
        if store is not None and len(gone):
            kept = store.without(gone, _index_dir(ws), prefix)
        if info.index_type in IVF_KINDS:
            ivf = _ivf_of(old)
            radii = _radii(ivf).copy()  # removals leave every list's radius an upper bound
            errors = None
            if store is not None:  # an index saved without per-list errors: its overall one for every list
                errors = (store.list_errors if store.list_errors is not None else np.full(ivf.nlist, store.error, np.float32)).copy()
            scratch = _Scratch(_index_dir(ws), ivf.code_size)
            try:
                sizes = np.zeros(ivf.nlist, np.int64)
                if source is not None:
                    sizes = _encode_ivf(ivf, chunks, _Assigner(_centroids(ivf), gpu_backend()), scratch, observers, radii, errors)
                _fill_ivf(ivf, sizes, scratch, drop=gone)
            finally:
                scratch.close()
            index = ivf
        else:
            base_old = faiss.downcast_index(old.index)
            base = _exact_base(info.index_type, info.dim)
            if info.index_type != "flat":
                base.sq = base_old.sq
                base.is_trained = True
            index = faiss.IndexIDMap2(base)
            err = _fill_exact(index, len(ids), chunks, observers, copy_from=old, measure_error=writer is not None, drop=gone)
        if store is not None:
            segments = (kept if kept is not None else store).segments + ([writer.finish()] if writer is not None else [])
            segments = rf.compact(segments, _index_dir(ws), prefix)
            if errors is not None:
                attach_refine(index, rf.RefineStore(segments, float(errors.max(initial=0.0)), errors))
            else:
                attach_refine(index, rf.RefineStore(segments, max(store.error, err)))
        else:
            attach_refine(index, None)
        if int(index.ntotal) != len(ids):
            raise RuntimeError(f"internal error: the updated index holds {int(index.ntotal)} vectors, {len(ids)} expected")
        info.count = int(index.ntotal)
        info.appended_at = dt.datetime.now(dt.UTC).isoformat()
        info.source_key = key
        out = _save(ws, index, info, radii, appended=True)
    except BaseException:
        if writer is not None:
            writer.abort()
        # what this update wrote (segments after removals, merges, a half-saved index) is named
        # by no index.json: remove it now, not at the next save (copies can be gigabytes)
        with contextlib.suppress(Exception):
            _remove_unnamed(ws, read_index_info(ws))
        raise
    del old
    return out


# An `embed` stopped by Ctrl-C or an error rebuilds a stale index only up to this many images (a
# 10M rebuild takes many minutes); a larger one stays stale, and says so, until `curator index`
# or the next `embed`.
STOP_REBUILD_MAX = 200_000


def sync_index_after_stop(ws: Workspace) -> IndexInfo | None:
    """:func:`sync_index` for an ``embed`` that was interrupted or failed, called from its
    exception handler under the writer lock, after its last commit: appends the images it
    committed, rebuilds only small indexes, and never raises (a failure is logged; the searches
    report the index as stale and the next ``embed`` or ``curator index`` repairs it). Does
    nothing when the exception being handled came out of ``sync_index`` itself."""
    tb = sys.exc_info()[2]
    if tb is not None and any(frame.f_code is sync_index.__code__ for frame, _ in traceback.walk_tb(tb)):
        log.warning("the index was being updated when the run stopped; `curator index --workspace %s` or the next "
                    "`curator embed` updates it", ws.root)
        return None
    try:
        return sync_index(ws, max_rebuild=STOP_REBUILD_MAX)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        log.warning("the index could not be updated (%s: %s); `curator index --workspace %s` or the next `curator embed` "
                    "updates it", type(exc).__name__, exc, ws.root)
        return None


def _current_ids_con(con, checkpoint: str) -> np.ndarray:
    got = con.execute("SELECT image_id FROM embeddings WHERE checkpoint = ?", [checkpoint]).fetchnumpy()["image_id"]
    return np.unique(np.asarray(got, dtype=np.int64))


def index_staleness(ws: Workspace, info: IndexInfo, index=None, con=None) -> str | None:
    """None when the index holds exactly the images of ``ws``'s current catalog (that have an
    embedding of its checkpoint), else a sentence saying what it lacks and what to run.

    Cheap when current: the recorded :func:`index_source_key` equals the workspace's. Otherwise
    (the workspace changed since the index was written, or the index predates keys) the index's
    ids are compared with the catalog's, as ``curator verify`` does; equal counts prove nothing (a
    changed file adds one image and supersedes another). ``index`` (the loaded index) and
    ``con`` (a connection to ``ws``) save loading them again.
    """
    if info.source_key and info.source_key == index_source_key(ws):
        return None
    if index is None:
        index, info = load_index(ws)
    have = np.sort(index_ids(index))
    if con is None:
        want = current_ids(ws, info.checkpoint)
    else:
        want = _current_ids_con(con, info.checkpoint)
    if np.array_equal(have, want):
        return None
    missing = int((~_isin_sorted(want, have)).sum())
    extra = int((~_isin_sorted(have, want)).sum())
    what = []
    if missing:
        what.append(f"lacks {missing:,} of the workspace's {len(want):,} images (searches cannot find them)")
    if extra:
        what.append(f"holds {extra:,} that are no longer current")
    if not what:
        what.append("holds some images twice")
    return (f"the index is out of date: it {' and '.join(what)}; an `embed` probably stopped before updating it. "
            f"Run `curator index --workspace {ws.root}` (or `curator embed` again) to update it.")


def _index_dir(ws: Workspace) -> Path:
    folder = ws.root / INDEX_DIR
    folder.mkdir(exist_ok=True)
    return folder


def _save(ws: Workspace, index, info: IndexInfo, radii: np.ndarray | None = None, appended: bool = False) -> IndexInfo:
    """Write the index file (and an IVF's list radii) under new names, then the JSON that names
    them (and the refine segments already written) atomically, then delete the files it no
    longer names: a crash at any point leaves index.json naming a complete, matching set."""
    faiss = _faiss()
    store = refine_of(index)
    if store is not None and len(store.stems) != len(store.segments):
        raise RuntimeError("internal error: a refine segment with no file of its own cannot be saved")
    folder = _index_dir(ws)
    token = uuid.uuid4().hex[:8]
    name = f"{info.checkpoint[:12]}.{info.index_type}.{token}.faiss"
    tmp = folder / f".{name}.tmp"
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    tmp.replace(folder / name)
    info.radii_file = None
    if radii is not None:
        rname = f"{info.checkpoint[:12]}.{info.index_type}.{token}.radii.npz"
        rtmp = folder / f".{rname}.tmp"
        extra = {} if store is None or store.list_errors is None else {"errors": np.asarray(store.list_errors, np.float32)}
        with open(rtmp, "wb") as f:
            np.savez(f, radii=np.asarray(radii, np.float32), ntotal=np.int64(index.ntotal), **extra)
            f.flush()
            os.fsync(f.fileno())
        rtmp.replace(folder / rname)
        info.radii_file = f"{INDEX_DIR}/{rname}"
    info.refine_files = None if store is None else [f"{INDEX_DIR}/{Path(st).name}" for st in store.stems]
    info.refine_error = 0.0 if store is None else float(store.error)
    info.count = int(index.ntotal)
    info.file = f"{INDEX_DIR}/{name}"
    info.built_at = dt.datetime.now(dt.UTC).isoformat()
    if not appended or not info.trained_at:
        info.trained_at = info.built_at
    _write_info(ws, info)
    _remove_unnamed(ws, info)
    return info


def _remove_unnamed(ws: Workspace, info: IndexInfo | None) -> None:
    """Delete index data files that ``info`` (the index.json in force) does not name: an earlier
    index's, or those of a build that died before its index.json (a 10M build's float16 copies
    are ~10 GB). index.json names the only index. Needs the lock."""
    keep = set() if info is None else {Path(f).name for f in _files_of(info)}
    for p in _index_dir(ws).iterdir():
        if p.name not in keep and p.suffix in (".faiss", ".npz", ".npy") and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


def _files_of(info: IndexInfo) -> list[str]:
    """The files (relative to the workspace) an index consists of."""
    out = [info.file] + ([info.radii_file] if info.radii_file else [])
    for stem in info.refine_files or []:
        out += [f"{stem}{suffix}" for suffix in rf.SUFFIXES]
    return out


def _write_info(ws: Workspace, info: IndexInfo) -> None:
    info.generation = int(ws.manifest.get("generation", 0))
    atomic_write_bytes(_index_dir(ws) / INDEX_META, json.dumps(dataclasses.asdict(info), indent=1).encode())


def read_index_info(ws: Workspace) -> IndexInfo | None:
    path = ws.root / INDEX_DIR / INDEX_META
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(IndexInfo)}
    info = IndexInfo(**{k: v for k, v in data.items() if k in known})
    info.index_type = _LEGACY_TYPES.get(info.index_type, info.index_type)
    return info


def read_index_file(path: str | Path, kind: str | None = None, mmap: bool | None = None):
    """Read an index file; memory-mapped (read-only) when ``mmap`` (default: files of at least
    ``MMAP_MIN_BYTES``) and the type supports it, else into memory.

    IVF types are mapped with ``IO_FLAG_MMAP`` (inverted lists on disk; adding raises), flat
    codes with ``IO_FLAG_MMAP_IFC``. Never add to a mapped index: :func:`sync_index` copies it.
    """
    faiss = _faiss()
    path = Path(path)
    want = mmap if mmap is not None else path.stat().st_size >= MMAP_MIN_BYTES
    if want:
        flag = faiss.IO_FLAG_MMAP if kind in IVF_KINDS else getattr(faiss, "IO_FLAG_MMAP_IFC", None)
        if flag is not None:
            try:
                index = faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
                _stash(index, "_curator_mmapped", True)
                return index
            except Exception as exc:  # noqa: BLE001 - this FAISS cannot map the type: read it
                log.info("cannot memory-map %s (%s); reading it", path.name, exc)
    index = faiss.read_index(str(path))
    _stash(index, "_curator_mmapped", False)
    return index


def load_index(ws: Workspace, mmap: bool | None = None):
    """(index, info) of the workspace; see :func:`read_index_file` for ``mmap``.

    A writer saving meanwhile deletes the files the index.json read a moment before named (each
    save writes new names): the load then reads index.json again and retries."""
    info = read_index_info(ws)
    for attempt in range(3):
        if info is None:
            raise WorkspaceError(f"{ws.root}: no index yet; run `curator index --workspace {ws.root}`")
        try:
            return _load_index(ws, info, mmap)
        except (OSError, RuntimeError, WorkspaceError):
            now = read_index_info(ws)
            if attempt == 2 or now is None or (now.file, now.refine_files) == (info.file, info.refine_files):
                raise
            log.info("the index was replaced while being loaded: loading the new one")
            info = now


def _load_index(ws: Workspace, info: IndexInfo, mmap: bool | None):
    index = read_index_file(ws.root / info.file, info.index_type, mmap)
    if info.refine_files:
        try:
            store = rf.RefineStore.open(ws.root, info.refine_files, info.refine_error)
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"{ws.root}: the index's float16 copies cannot be read ({exc}); "
                                 f"run `curator index --workspace {ws.root}` to rebuild it") from exc
        if store.count != int(index.ntotal):
            raise WorkspaceError(f"{ws.root}: the index holds {int(index.ntotal)} vectors but its float16 copies "
                                 f"{store.count}; run `curator index --workspace {ws.root}` to rebuild it")
        attach_refine(index, store)
    ivf = _ivf_of(index)
    if ivf is not None:
        if info.nprobe:
            ivf.nprobe = int(info.nprobe)
        if info.radii_file:
            with contextlib.suppress(OSError, KeyError, ValueError), np.load(ws.root / info.radii_file) as z:
                if int(z["ntotal"]) == int(index.ntotal) and len(z["radii"]) == ivf.nlist:
                    _stash(ivf, "_curator_radii", np.asarray(z["radii"], np.float32))
                    store = refine_of(index)
                    if store is not None and "errors" in z.files and len(z["errors"]) == ivf.nlist:
                        store.list_errors = np.asarray(z["errors"], np.float32)
    return index, info


# ------------------------------------------------------------------------------------------------
# Searching


def _ivf_of(index):
    """The IVF index itself (the tool builds bare IVF indexes, so cached attributes stick to the
    object callers hold), or the IVF inside a wrapper, or None."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        return index
    return faiss.try_extract_index_ivf(index)


def attach_refine(index, store: rf.RefineStore | None) -> None:
    """Make searches of ``index`` re-rank their candidates from ``store`` (see curator.refine)."""
    _stash(index, "_curator_refine", store)


def refine_of(index) -> rf.RefineStore | None:
    return getattr(index, "_curator_refine", None)


def _refined(index, q: np.ndarray, k: int, limit: int, search: Callable[[int], tuple[np.ndarray, np.ndarray]]):
    """``search(k)``, or with a refine store the top k of ``search(REFINE_FACTOR * k)`` re-scored."""
    store = refine_of(index)
    if store is None:
        return search(k)
    sims, ids = search(rf.candidates(k, limit))
    return store.rescore(q, ids, sims, k)


def search_vectors(index, queries: np.ndarray, k: int, allowed_ids=None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest; ids of -1 (fewer hits than k) are dropped by callers.

    ``allowed_ids`` restricts the search to those image ids (see :func:`search_vectors_filtered`).
    An index with a refine store returns the similarities of its float16 vectors, not its codes'.
    ``nprobe``: an IVF index's lists to probe (default: its own, tuned on image queries; searches
    by text pass ``IndexInfo.nprobe_text``).
    """
    if allowed_ids is not None:
        return search_vectors_filtered(index, queries, k, allowed_ids, nprobe)
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), int(index.ntotal)))
    ivf = _ivf_of(index)
    if ivf is not None:
        return _refined(index, q, k, index.ntotal, lambda kk: _ivf_search(index, ivf, q, kk, None, nprobe, enough=k))
    return _refined(index, q, k, index.ntotal, lambda kk: index.search(q, kk))


# -- filtered search ----------------------------------------------------------------------------
# Below this many allowed ids a hash set (IDSelectorBatch) is built; above it a bitmap over the
# id range (IDSelectorBitmap), which is faster to make for large sets.
_BATCH_SELECTOR_MAX = 65536
# IVF: with a fraction s of the images allowed, probe min(1/s, this) lists, at least the tuned
# nprobe (checking an id against the selector costs far less than scoring a vector)
FILTER_NPROBE_BOOST = 16
# IVF: small allowed sets (up to ~sqrt(N)/2 images, never more than this) are scored exactly
# from their stored codes
EXACT_FILTER_MAX = 20_000


def id_selector(allowed_ids):
    """A FAISS ID selector admitting exactly ``allowed_ids`` (catalog ``image_id`` values).

    Returns ``(selector, keepalive)``: FAISS's bitmap selector points into a numpy array that
    must outlive the search, so callers keep ``keepalive`` referenced until then.
    """
    faiss = _faiss()
    ids = _sorted_unique(allowed_ids)
    if len(ids) and ids[0] < 0:
        raise ValueError("image ids are never negative")
    if len(ids) <= _BATCH_SELECTOR_MAX:
        return faiss.IDSelectorBatch(ids), ids
    return _bitmap_selector(ids)


def _bitmap_selector(ids: np.ndarray):
    """IDSelectorBitmap over sorted unique non-negative ids: one bit per id up to the largest."""
    faiss = _faiss()
    bitmap = np.zeros((int(ids[-1]) >> 3) + 1 if len(ids) else 1, dtype=np.uint8)
    np.bitwise_or.at(bitmap, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
    # n counts bytes: FAISS admits id i when i >> 3 < n and bit (i & 7) of byte i >> 3 is set.
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def _compact_selector(allowed: np.ndarray):
    """For IVF searches: a bitmap whenever it is small (<= 1 MB, or <= 64 bytes an allowed id),
    which is made in microseconds where a hash set of 10,000 ids takes about a millisecond."""
    ids = _sorted_unique(allowed)
    if len(ids) and ids[0] >= 0 and ((int(ids[-1]) >> 3) + 1) <= max(1 << 20, 64 * len(ids)):
        return _bitmap_selector(ids)
    return id_selector(ids)


def search_vectors_filtered(index, queries: np.ndarray, k: int, allowed_ids=None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`search_vectors`, restricted to ``allowed_ids`` (None = every image).

    The restriction is applied inside the search (FAISS ``SearchParameters(sel=...)`` on the CPU
    index), so k results come back whenever at least k allowed images are indexed. Flat types
    return the exact top-k among the allowed images. IVF types probe more lists the more
    selective the filter is, probe again with more lists for queries still short of k, and score
    small allowed sets exactly from their stored codes. Without a filter, a flat index uses an
    all-pass selector: FAISS then spreads one query over all its threads, which its plain path
    does not.
    """
    faiss = _faiss()
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    ivf = _ivf_of(index)
    if allowed_ids is None:
        k = max(1, min(int(k), int(index.ntotal)))
        limit = int(index.ntotal)
        if ivf is not None:
            return _refined(index, q, k, limit, lambda kk: _ivf_search(index, ivf, q, kk, None, nprobe, enough=k))
        selector, keep = faiss.IDSelectorAll(), None
    else:
        allowed = _sorted_unique(allowed_ids)
        if len(allowed) == 0 or index.ntotal == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        k = max(1, min(int(k), int(index.ntotal), len(allowed)))
        limit = min(int(index.ntotal), len(allowed))
        if ivf is not None:
            return _refined(index, q, k, limit, lambda kk: _ivf_search(index, ivf, q, kk, allowed, nprobe, enough=k))
        selector, keep = id_selector(allowed)
    out = _refined(index, q, k, limit, lambda kk: index.search(q, kk, params=faiss.SearchParameters(sel=selector)))
    del keep  # the selector may point into it: keep it alive until here
    return out


def _ivf_search(index, ivf, q: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int | None, enough: int | None = None):
    """IVF top-k, probing more lists for queries that come back with fewer than ``enough``
    (default k) results: a re-ranked search asks for REFINE_FACTOR * k candidates, but k
    suffice."""
    enough = k if enough is None else min(k, enough)
    faiss = _faiss()
    nlist, ntotal = ivf.nlist, max(1, int(ivf.ntotal))
    nprobe = int(nprobe or ivf.nprobe)
    keep = None
    if allowed is not None:
        # probe min(1/s, FILTER_NPROBE_BOOST) lists (s: the share allowed), at least the tuned
        # nprobe and enough lists to expect 4k allowed candidates. Checking an id costs a few ns,
        # scoring a vector from its codes ~1 us: scoring the allowed set itself is cheaper only
        # while it is smaller than about sqrt(N) / 2. (The boost used to multiply the tuned
        # nprobe; where the codes limit recall the tuner stops at 2 or 4 probes, and 32-64 lists
        # at 1% made a filtered query 3.5x an unfiltered one at 10M.)
        boost = min(ntotal / len(allowed), FILTER_NPROBE_BOOST)
        need = math.ceil(4 * enough * nlist / len(allowed))
        nprobe = int(min(nlist, max(nprobe, math.ceil(boost), need)))
        if len(allowed) <= min(EXACT_FILTER_MAX, max(256, math.sqrt(ntotal) / 2)):
            got = _exact_among(index, q, k, allowed)
            if got is not None:
                return got
        selector, keep = _compact_selector(allowed)
    want = min(enough, ntotal if allowed is None else len(allowed))
    params = faiss.SearchParametersIVF(nprobe=nprobe) if allowed is None else faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    sims, ids = index.search(q, k, params=params)
    short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    while len(short) and nprobe < nlist:
        nprobe = min(nlist, nprobe * 4)
        params.nprobe = nprobe
        s2, i2 = index.search(np.ascontiguousarray(q[short]), k, params=params)
        sims[short], ids[short] = s2, i2
        short = short[(i2 >= 0).sum(axis=1) < want]
    del keep
    return sims, ids


def _exact_among(index, q: np.ndarray, k: int, allowed: np.ndarray, block: int = 4096):
    """Exact top-k among ``allowed`` from the stored codes, or the refine store's float16 vectors
    when the index has one (None when they cannot be read)."""
    store = refine_of(index)
    if store is not None:
        vecs, found = store.lookup(allowed)
        ids, vecs = allowed[found], vecs[found]
    else:
        try:
            ids, vecs = _reconstruct_many(index, allowed, block)
        except RuntimeError:
            return None
    kk = min(k, len(ids))
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if kk == 0:
        return out_s, out_i
    sims = q @ vecs.T
    order = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=1)[:, :kk]
    out_s[:, :kk] = np.take_along_axis(sims, order, axis=1)
    out_i[:, :kk] = ids[order]
    return out_s, out_i


def _reconstruct_many(index, ids: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(ids present in the index, their stored vectors)."""
    out_ids, out = [], []
    for s in range(0, len(ids), block):
        b = np.ascontiguousarray(ids[s:s + block])
        try:
            v = index.reconstruct_batch(b)
        except RuntimeError:
            b = b[_isin_sorted(b, _sorted_ids(index))]
            v = index.reconstruct_batch(b) if len(b) else np.zeros((0, index.d), np.float32)
        out_ids.append(b)
        out.append(np.asarray(v, dtype=np.float32).reshape(len(b), index.d))
    if not out:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    return np.concatenate(out_ids), np.concatenate(out)


def _sorted_ids(index) -> np.ndarray:
    got = getattr(index, "_curator_sorted_ids", None)
    if got is None or len(got) != index.ntotal:
        got = np.sort(index_ids(index))
        _stash(index, "_curator_sorted_ids", got)
    return got


# -- range search -------------------------------------------------------------------------------


def _radii(ivf) -> np.ndarray:
    """Per list, the largest |x^ - centroid| of its stored vectors (cached on the index)."""
    r = getattr(ivf, "_curator_radii", None)
    if r is not None and len(r) == ivf.nlist:
        return r
    faiss = _faiss()
    r = np.zeros(ivf.nlist, np.float32)
    il = ivf.invlists
    for lst in range(ivf.nlist):
        n = il.list_size(lst)
        if n == 0:
            continue
        p = il.get_codes(lst)
        codes = faiss.rev_swig_ptr(p, n * ivf.code_size).reshape(n, ivf.code_size).copy()
        il.release_codes(lst, p)
        r[lst] = _residual_norms(ivf, np.full(n, lst, np.int64), codes).max()
    _stash(ivf, "_curator_radii", r)
    return r


def range_search(index, query: np.ndarray, threshold: float, allowed_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed image whose similarity to ``query`` is above ``threshold``: ``(ids, sims)``,
    most similar first (ties: smaller id first). ``allowed_ids`` restricts it to those images.

    Exact with respect to the stored codes for every type: an IVF index scans exactly the lists
    that can hold such a vector (centroid similarity + the list's radius times |query| above the
    threshold), not just ``nprobe`` of them. With a refine store, exact with respect to its
    float16 vectors: the codes are searched down to ``threshold - error * |query|`` (no vector
    above the threshold can score below it; for IVF, each list's own largest error, the lists
    scanned in a few groups of similar errors). Hits whose code score is above ``threshold +
    error * |query|`` are in for certain; the rest are scored again (all of them while there
    are at most ``refine.RESCORE_ALL_MAX`` hits). PQ codes' errors (up to ~0.25) would pass most
    of the index: the members of lists whose margin would exceed ``refine.RANGE_MARGIN_MAX`` are
    scored from the float16 copies instead, every one (exact, but read from disk: seconds at
    millions of images; a warning says so). For cohorts defined by a text query.
    """
    faiss = _faiss()
    q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
    store = refine_of(index)
    want = float(threshold)
    qn = float(np.linalg.norm(q[0]))
    ivf = _ivf_of(index)
    # how far a code score may lie below its vector's float16 score: PQ's is capped
    cap = rf.RANGE_MARGIN_MAX if ivf is not None and isinstance(ivf, faiss.IndexIVFPQ) else np.inf
    # the codes' cut: FAISS keeps scores strictly above it, computed in float32 (1e-5 to spare)
    thr = want
    if not np.isfinite(want) or not np.isfinite(qn):
        raise ValueError(f"range search needs a finite threshold and query (threshold {threshold!r})")
    allowed = None
    if allowed_ids is not None:
        allowed = _sorted_unique(allowed_ids)
        if len(allowed) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if index.ntotal == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if store is not None:
        thr = want - store.error * qn - 1e-5
    keep = None
    sel = None
    if allowed is not None:
        sel, keep = _compact_selector(allowed)
    exact_s, exact_i = np.zeros(0, np.float32), np.zeros(0, np.int64)  # hits scored from the copies already
    if ivf is None:
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        lims, sims, ids = index.range_search(q, thr, params=params)
        margins = np.full(len(ids), want - thr, np.float32)
    else:
        cq = (_centroids(ivf) @ q[0]).astype(np.float32)
        cut = np.full(ivf.nlist, thr, np.float32)  # each list's cut
        errs = None if store is None else store.list_errors
        if store is not None:
            e = np.asarray(errs if errs is not None and len(errs) == ivf.nlist else np.full(ivf.nlist, store.error), np.float32) * qn
            cut = (want - e - 1e-5).astype(np.float32)
        reach = cq + _radii(ivf) * qn + 1e-4  # (a copy lies within radius + error of its centroid)
        lists = np.flatnonzero(reach > cut)
        if len(lists) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if store is not None and np.isfinite(cap):
            # lists whose PQ codes are too coarse to cut by (it would pass most of them): their
            # members are scored from the copies instead, every one (exact; reads them all)
            wide = lists[e[lists] > cap]
            if len(wide):
                say = log.info if store.range_warned else log.warning  # (a warning once per index)
                store.range_warned = True
                say("range search over PQ codes: %d of the %d lists it must visit have codes too coarse to cut by "
                    "(error up to %.3f); their members are scored from the float16 copies (exact, but slower)",
                    len(wide), len(lists), float(e[wide].max()))
                exact_i, exact_s = _score_lists(ivf, store, q[0], wide, allowed)
                lists = lists[e[lists] <= cap]
        found_s, found_i, found_m = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for group in (_groups_by_cut(lists, cut) if len(lists) else []):  # one scan per group, at its lowest cut
            group = group[np.argsort(-cq[group], kind="stable")]
            low = float(cut[group].min())
            s_, i_ = _range_in_lists(ivf, q, low, group, cq, sel)
            found_s.append(s_)
            found_i.append(i_)
            found_m.append(np.full(len(i_), want - low, np.float32))
        sims, ids, margins = np.concatenate(found_s), np.concatenate(found_i), np.concatenate(found_m)
    del keep
    sims, ids = np.asarray(sims, np.float32), np.asarray(ids, np.int64)
    if store is not None and len(ids):
        # a hit whose code score beats the threshold by its margin is in whatever its float16
        # score; the others are scored again. Every hit is while they are few enough.
        again = np.ones(len(ids), bool) if len(ids) <= rf.RESCORE_ALL_MAX else sims <= want + margins
        if not again.all():
            log.info("range search: %d hits; %d certain by their codes keep their code scores, %d scored again",
                     len(ids), int((~again).sum()), int(again.sum()))
        sims[again] = store.score(q[0], ids[again], sims[again])
    sims, ids = np.concatenate([sims, exact_s]), np.concatenate([ids, exact_i])
    m = sims > want
    sims, ids = sims[m], ids[m]
    order = np.lexsort((ids, -sims))
    return ids[order], sims[order]


def _score_lists(ivf, store, q: np.ndarray, lists: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, sims)`` of every member of the IVF ``lists`` (among the sorted ``allowed``), scored
    from the refine ``store``'s float16 copies (a member it lacks keeps a score of -inf)."""
    faiss = _faiss()
    il = ivf.invlists
    parts = []
    for lst in lists.tolist():
        n = il.list_size(lst)
        if n:
            ptr = il.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64))
            il.release_ids(lst, ptr)
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if allowed is not None:
        ids = ids[rf.isin_sorted(ids, allowed)]
    ids = np.sort(ids)  # (the copies are read in id order, block by block)
    sims = store.score(q, ids, np.full(len(ids), -np.inf, np.float32))
    if len(ids) and not np.isfinite(sims).all():  # (it should hold every one)
        log.warning("the index's refine store lacks %d of the vectors a range search needs; they are left out: run "
                    "`curator index` to rebuild it", int((~np.isfinite(sims)).sum()))
    return ids, sims


def _groups_by_cut(lists: np.ndarray, cut: np.ndarray) -> list[np.ndarray]:
    """``lists`` in a few groups of similar cuts: the half with the highest, then the next
    quarter, ..., the lowest 1% (a list's code error sets its cut; a few lists hold the largest
    errors, and scanning every list at theirs would pass far more candidates)."""
    c = cut[lists]
    if len(lists) < 16 or float(c.max() - c.min()) < 1e-6:
        return [lists]
    edges = np.quantile(c, [0.01, 0.03, 0.10, 0.25, 0.5])
    bins = np.digitize(c, edges, right=True)
    return [lists[bins == b] for b in range(len(edges) + 1) if (bins == b).any()]


def _range_in_lists(ivf, q: np.ndarray, thr: float, lists: np.ndarray, cq: np.ndarray, sel) -> tuple[np.ndarray, np.ndarray]:
    """(sims, ids) of the vectors of ``lists`` whose code score is above ``thr``."""
    faiss = _faiss()
    keys = np.ascontiguousarray(lists.astype(np.int64)[None, :])
    coarse = np.ascontiguousarray(cq[lists][None, :])
    params = faiss.SearchParametersIVF(nprobe=len(lists)) if sel is None else faiss.SearchParametersIVF(sel=sel, nprobe=len(lists))
    res = faiss.RangeSearchResult(1)
    ivf.range_search_preassigned_c(1, faiss.swig_ptr(q), thr, faiss.swig_ptr(keys), faiss.swig_ptr(coarse), res, False, params)
    nres = int(faiss.rev_swig_ptr(res.lims, 2)[1])
    sims = faiss.rev_swig_ptr(res.distances, nres).copy() if nres else np.zeros(0, np.float32)
    ids = faiss.rev_swig_ptr(res.labels, nres).copy() if nres else np.zeros(0, np.int64)
    return sims, ids


def reconstruct(index, image_id: int) -> np.ndarray | None:
    """The stored vector of ``image_id`` (None when the index does not hold it): the refine
    store's float16 copy when the index has one; otherwise quantised types (fp16, sq8, ivf-sq8,
    ivf-pq) give the vector their codes stand for."""
    store = refine_of(index)
    if store is not None:
        vec, found = store.lookup(np.array([image_id], np.int64))
        if found[0]:
            return vec[0]
    try:
        return np.asarray(index.reconstruct(int(image_id)), dtype=np.float32)
    except RuntimeError:
        return None


def index_ids(index) -> np.ndarray:
    """The image ids an index holds (IndexIDMap / IndexIDMap2, or IVF with its own ids), unordered."""
    faiss = _faiss()
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or hasattr(index, "id_map"):
        n = int(index.ntotal)
        return faiss.rev_swig_ptr(index.id_map.data(), n).astype(np.int64) if n else np.zeros(0, np.int64)
    ivf = _ivf_of(index)
    if ivf is None:
        raise TypeError(f"{type(index).__name__} has no image ids")
    il = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = il.list_size(lst)
        if n:
            p = il.get_ids(lst)
            out.append(faiss.rev_swig_ptr(p, n).astype(np.int64))
            il.release_ids(lst, p)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def current_embeddings(ws: Workspace, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the current catalog rows for one checkpoint, in memory (small workspaces;
    index builds stream instead: :class:`WorkspaceVectors`)."""
    src = WorkspaceVectors(ws, checkpoint)
    if src.count == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return src.take(src.ids)
