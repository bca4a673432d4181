"""Exact re-ranking for indexes with lossy codes: float16 copies of the vectors, kept on disk.

8-bit and PQ codes move each similarity by up to ~1e-2, while the 10th and 11th neighbours of a
query among near-duplicate radiographs (or in a tight cluster of synthetic vectors) differ by
~1e-4: the codes find the right neighbourhood but rank it out of order (recall@10 ~0.94 at 10M
for IVF-SQ8 however many lists are probed). An index with a refine store asks its codes for
:data:`REFINE_FACTOR` times k candidates and scores those again against float16 copies of the
vectors (error ~1e-5), read from disk: a query reads its candidates' rows (40 rows of 1 KB for
k = 10) with ``pread``, not the file, and maps nothing, so memory stays that of the codes plus
16 bytes a vector for the ids; the disk holds 2 bytes a dimension.

A store is a list of segments; a build writes one, each append adds one. A segment is three
``.npy`` files (readable with ``numpy.load``)::

    <stem>.vectors.npy  (n, d) float16, rows in the order they were written
    <stem>.ids.npy      (n,)   int64 image ids, ascending
    <stem>.rows.npy     (n,)   int64, the row of vectors holding each of those ids

Segments are written to temporary names and renamed when complete; the index's JSON lists the
segments it uses (see :mod:`curator.index`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# candidates asked of the codes per result wanted
REFINE_FACTOR = 4
SUFFIXES = (".vectors.npy", ".ids.npy", ".rows.npy")
# appends add segments; beyond this many, all but the largest are merged into one (a lookup
# visits every segment)
MAX_SEGMENTS = 8
# range search over PQ codes: the cut is lowered by at most this (their errors can reach 0.25,
# which would pass most of the index; 8-bit codes are lowered by their full error)
RANGE_MARGIN_MAX = 0.05
# range search: up to this many hits are all scored again; beyond, only those whose code score
# does not already settle them (the similarities of the rest are their codes')
RESCORE_ALL_MAX = 200_000
# rows looked up at a time when scoring many (bounded memory)
LOOKUP_BLOCK = 16_384


def candidates(k: int, limit: int) -> int:
    """How many candidates the codes are asked for to return ``k`` re-ranked results."""
    return int(max(1, min(int(limit), REFINE_FACTOR * int(k))))


def disk_bytes(n: int, dim: int) -> int:
    """Size of a store of ``n`` vectors of ``dim``."""
    return int(n) * (2 * int(dim) + 16)


class Segment:
    """One segment: its ids (sorted) and rows in memory (16 bytes a vector), its float16 vectors
    either in memory or read from the file row by row (``os.pread``: a query's few rows go
    through the page cache without being mapped into the process, so its memory does not grow
    with the rows searches touch, as it would with a memory map)."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray, vectors: np.ndarray | None = None, stem: str | None = None,
                 path: Path | None = None, shape: tuple[int, int] | None = None, offset: int = 0):
        n = len(vectors) if vectors is not None else shape[0]
        if not (len(ids) == len(rows) == n):
            raise ValueError(f"refine segment {stem}: {len(ids)} ids, {len(rows)} rows, {n} vectors")
        self.ids, self.rows, self.stem = ids, rows, stem
        self._memory = vectors
        self.dim = int(vectors.shape[1] if vectors is not None else shape[1])
        self._fd = None
        self._offset = int(offset)
        if vectors is None:
            self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, root: Path, stem: str) -> Segment:
        """The segment ``root/stem``: ids and rows read, the vectors' file opened."""
        base = Path(root) / stem
        ids, rows = (np.load(f"{base}{s}", allow_pickle=False) for s in SUFFIXES[1:])
        path = Path(f"{base}{SUFFIXES[0]}")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{path.name}: .npy format {version} not supported")
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            offset = f.tell()
        if dtype != np.float16 or fortran or len(shape) != 2 or ids.dtype != np.int64 or rows.dtype != np.int64:
            raise ValueError(f"{stem}: not a refine segment (vectors {dtype}{shape}, ids {ids.dtype}, rows {rows.dtype})")
        if path.stat().st_size < offset + 2 * shape[0] * shape[1]:
            raise ValueError(f"{path.name} is truncated")
        return cls(ids, rows, None, stem, path, shape, offset)

    def __len__(self) -> int:
        return len(self.ids)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of ``rows`` (ascending rows read fastest: runs are read at once)."""
        rows = np.asarray(rows, np.int64)
        if self._memory is not None:
            return np.asarray(self._memory[rows], np.float32)
        out = np.empty((len(rows), self.dim), np.float16)
        if len(rows) == 0:
            return out.astype(np.float32)
        row_bytes = 2 * self.dim
        # runs of consecutive rows: one read each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            want = (b - a) * row_bytes
            buf = os.pread(self._fd, want, self._offset + int(rows[a]) * row_bytes)
            if len(buf) != want:
                raise OSError(f"refine segment {self.stem}: short read")
            out[a:b] = np.frombuffer(buf, np.float16).reshape(b - a, self.dim)
        return out.astype(np.float32)


class SegmentWriter:
    """Writes one segment from streamed (ids, float32 vectors) chunks; callable as a build observer.

    With ``folder`` the vectors go straight to ``<stem>.vectors.npy`` (file writes, no mapping: the
    build's memory does not grow with them), else into memory (tests, small jobs). ``n`` is the
    number of vectors to come (the ``.npy`` header is written first).
    """

    def __init__(self, n: int, dim: int, folder: Path | None = None, prefix: str = "refine"):
        self.n, self.dim = int(n), int(dim)
        self.at = 0
        self.ids = np.empty(self.n, np.int64)
        self.folder = Path(folder) if folder is not None else None
        self.stem = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self._file = None
        self._memory = None
        if self.folder is None:
            self._memory = np.empty((self.n, self.dim), np.float16)
            return
        need, free = disk_bytes(self.n, self.dim), shutil.disk_usage(self.folder).free
        if need > free:
            raise OSError(errno.ENOSPC, f"the float16 copies for re-ranking need ~{need / 2**30:.2f} GB and {self.folder} has "
                          f"{free / 2**30:.2f} GB free; free some space or build with --no-refine (lower recall@10 for "
                          f"sq8 / ivf-sq8 / ivf-pq)")
        self._tmp = [self.folder / f".{self.stem}{s}.tmp" for s in SUFFIXES]
        self._file = open(self._tmp[0], "wb")  # noqa: SIM115 - closed by finish() / abort()
        np.lib.format.write_array_header_1_0(
            self._file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (self.n, self.dim)})

    def __call__(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        m = len(ids)
        if self.at + m > self.n:
            raise RuntimeError(f"internal error: more than the {self.n} vectors announced for the refine store")
        if vecs.shape != (m, self.dim):
            raise ValueError(f"refine store: vectors of shape {vecs.shape}, expected ({m}, {self.dim})")
        self.ids[self.at:self.at + m] = ids
        half = np.ascontiguousarray(vecs, dtype=np.float16)
        if self._memory is not None:
            self._memory[self.at:self.at + m] = half
        else:
            self._file.write(half.tobytes())
        self.at += m

    def finish(self) -> Segment:
        """Complete the segment (sorted ids, files renamed into place and synced)."""
        if self.at != self.n:
            self.abort()
            raise RuntimeError(f"internal error: {self.at} vectors written to the refine store, {self.n} announced")
        rows = np.argsort(self.ids, kind="stable")
        ids = self.ids[rows]
        if len(ids) > 1 and bool(np.any(ids[1:] == ids[:-1])):
            self.abort()
            raise ValueError("refine store: an image id came twice")
        if self._memory is not None:
            return Segment(ids, rows.astype(np.int64), self._memory)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            for path, arr in zip(self._tmp[1:], (ids, rows.astype(np.int64))):
                with open(path, "wb") as f:
                    np.save(f, arr, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            for tmp, suffix in zip(self._tmp, SUFFIXES):
                tmp.replace(self.folder / f"{self.stem}{suffix}")
        except BaseException:
            self.abort()
            raise
        return Segment.open(self.folder, self.stem)

    def abort(self) -> None:
        """Remove what was written (a failed build leaves no segment)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            for p in self._tmp:
                with contextlib.suppress(OSError):
                    p.unlink()


class RefineStore:
    """The float16 vectors of an index's images, by image id, over one or more segments."""

    def __init__(self, segments: list[Segment], error: float = 0.0, list_errors: np.ndarray | None = None):
        self.segments = list(segments)
        # the largest |x16 - x^| between a float16 copy and what its vector's code stands for:
        # code similarities are within error * |q| of the copies' (range searches widen their
        # cut by it); for IVF, also per list (most lists' are far below the largest)
        self.error = float(error)
        self.list_errors = list_errors
        self._warned = False

    @classmethod
    def open(cls, root: Path, stems: list[str], error: float = 0.0) -> RefineStore:
        return cls([Segment.open(root, s) for s in stems], error)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def stems(self) -> list[str]:
        return [s.stem for s in self.segments if s.stem]

    def score(self, q: np.ndarray, ids: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Similarities of one query ``q`` to the float16 vectors of ``ids`` (any number: looked
        up block by block); ``fallback`` (code scores) for ids the store lacks."""
        out = np.asarray(fallback, np.float32).copy()
        for s in range(0, len(ids), LOOKUP_BLOCK):
            vecs, found = self.lookup(ids[s:s + LOOKUP_BLOCK])
            blk = out[s:s + LOOKUP_BLOCK]
            blk[found] = vecs[found] @ np.asarray(q, np.float32)
        return out

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors of ``ids``, found mask); rows not found are zero."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        d = self.segments[0].dim if self.segments else 0
        out = np.zeros((len(ids), d), np.float32)
        found = np.zeros(len(ids), bool)
        for seg in self.segments:
            if len(seg) == 0:
                continue
            left = np.flatnonzero(~found)
            if len(left) == 0:
                break
            want = ids[left]
            pos = np.searchsorted(seg.ids, want)
            pos[pos >= len(seg)] = len(seg) - 1
            hit = seg.ids[pos] == want
            if not hit.any():
                continue
            rows = seg.rows[pos[hit]]
            order = np.argsort(rows, kind="stable")  # read the file front to back
            got = seg.take(rows[order])
            dest = left[hit][order]
            out[dest] = got
            found[dest] = True
        return out, found

    def rescore(self, q: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of each query's candidates (``ids`` with -1 for none, ``sims`` their code
        scores) by similarity to the float16 vectors, ties by smaller id. A candidate missing from
        the store (it should not be) keeps its code score."""
        q = np.atleast_2d(np.asarray(q, np.float32))
        nq, r = ids.shape
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        valid = ids >= 0
        if not valid.any():
            return out_s, out_i
        uniq, inv = np.unique(ids[valid], return_inverse=True)
        vecs, found = self.lookup(uniq)
        if not found.all() and not self._warned:
            self._warned = True
            log.warning("the index's refine store lacks %d of its candidates' vectors; run `curator index` to rebuild it",
                        int((~found).sum()))
        exact = np.full(ids.shape, -np.inf, np.float32)
        rows_q = np.nonzero(valid)[0]
        exact[valid] = np.einsum("ij,ij->i", vecs[inv], q[rows_q])
        miss = np.zeros(ids.shape, bool)
        miss[valid] = ~found[inv]
        exact[miss] = sims[miss]
        tie = np.where(valid, ids, np.iinfo(np.int64).max)
        order = np.lexsort((tie, -exact), axis=1)[:, :k]
        kk = order.shape[1]
        out_s[:, :kk] = np.take_along_axis(exact, order, axis=1)
        out_i[:, :kk] = np.where(np.isfinite(out_s[:, :kk]), np.take_along_axis(ids, order, axis=1), -1)
        return out_s, out_i

    def files(self) -> list[str]:
        return [f"{s}{suffix}" for s in self.stems for suffix in SUFFIXES]


def compact(segments: list[Segment], folder: Path | None, prefix: str = "refine") -> list[Segment]:
    """At most :data:`MAX_SEGMENTS` segments: beyond, all but the largest are merged into a new
    one (written like any segment; the merged ones' files are left for the caller to delete)."""
    if len(segments) <= MAX_SEGMENTS:
        return list(segments)
    big = max(range(len(segments)), key=lambda i: len(segments[i]))
    rest = [s for i, s in enumerate(segments) if i != big]
    w = SegmentWriter(sum(len(s) for s in rest), segments[big].dim, folder, prefix)
    try:
        for seg in rest:
            row_ids = np.empty(len(seg), np.int64)
            row_ids[np.asarray(seg.rows)] = np.asarray(seg.ids)
            for s in range(0, len(seg), LOOKUP_BLOCK):
                w(row_ids[s:s + LOOKUP_BLOCK], seg.take(np.arange(s, min(len(seg), s + LOOKUP_BLOCK))))
        merged = w.finish()
    except BaseException:
        w.abort()
        raise
    return [segments[big], merged]
