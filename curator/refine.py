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
    <stem>.ids.npy      (m,)   int64 image ids, ascending
    <stem>.rows.npy     (m,)   int64, the row of vectors holding each of those ids

m = n until images leave the index: an update then writes the segment's ids and rows again
under a new stem, the vectors file hard-linked, its removed rows left in place (m < n) until
fewer than half are live and the segment is rewritten.

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

from curator.workspace import atomic_write

log = logging.getLogger(__name__)

# candidates asked of the codes per result wanted
REFINE_FACTOR = 4
SUFFIXES = (".vectors.npy", ".ids.npy", ".rows.npy")
# appends add segments; beyond this many, all but the largest are merged into one (a lookup
# visits every segment)
MAX_SEGMENTS = 8
# range search over PQ codes: the cut is lowered by at most this (their errors can reach 0.25,
# which would pass most of the index; 8-bit codes are lowered by their full error); the members
# of lists whose margin would be larger are scored from the float16 copies instead
RANGE_MARGIN_MAX = 0.05
# range search: up to this many hits are all scored again; beyond, only those whose code score
# does not already settle them (the similarities of the rest are their codes')
RESCORE_ALL_MAX = 200_000
# a segment whose vectors file holds fewer than this share of live rows (the rest removed) is
# rewritten by the next compact
DEAD_MAX = 0.5
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
        # after removals (:meth:`without`) a segment's file keeps rows no id points at any more
        if len(ids) != len(rows) or len(ids) > n or (len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n)):
            raise ValueError(f"refine segment {stem}: {len(ids)} ids, {len(rows)} rows, {n} vectors")
        self.ids, self.rows, self.stem = ids, rows, stem
        self.nrows = int(n)  # rows in the vectors file, live or not
        self._memory = vectors
        self._path = path
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

    def without(self, drop: np.ndarray, folder: Path | None, prefix: str) -> Segment | None:
        """This segment less the ids in ``drop`` (sorted): itself when it holds none of them, else
        a new segment (new stem, so the index.json in force keeps naming a complete set) whose
        vectors file is the same file, hard-linked (copied where links are not supported): only
        its ids and rows are written. The dropped rows stay in the file until :func:`compact`
        rewrites a segment that is mostly dead; one that is after this removal is returned unnamed
        (reading the old file) for :func:`compact` to rewrite at once. None when no id is left."""
        keep = ~isin_sorted(self.ids, drop)
        if keep.all():
            return self
        if not keep.any():
            return None
        ids, rows = self.ids[keep], self.rows[keep]
        if self._memory is not None:
            return Segment(ids, rows, self._memory)
        if folder is None or len(ids) < DEAD_MAX * self.nrows:  # compact() rewrites it next: nothing written here
            return Segment(ids, rows, None, None, self._path, (self.nrows, self.dim), self._offset)
        folder = Path(folder)
        stem = f"{prefix}-{uuid.uuid4().hex[:12]}"
        dst = folder / f"{stem}{SUFFIXES[0]}"
        try:
            os.link(self._path, dst)
        except OSError:
            need, free = os.path.getsize(self._path), shutil.disk_usage(folder).free
            if need > free:
                raise OSError(errno.ENOSPC, f"updating the index's float16 copies needs {need / 2**30:.2f} GB (this file system "
                              f"cannot hard-link) and {folder} has {free / 2**30:.2f} GB free") from None
            with open(self._path, "rb") as src:
                atomic_write(dst, lambda f: shutil.copyfileobj(src, f, 1 << 24))
        for suffix, arr in zip(SUFFIXES[1:], (ids, rows)):
            _save_npy(folder / f"{stem}{suffix}", arr)
        return Segment.open(folder, stem)

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
        self._tmp = self.folder / f".{self.stem}{SUFFIXES[0]}.tmp"  # the vectors, until complete
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by finish() / abort()
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
            self._tmp.replace(self.folder / f"{self.stem}{SUFFIXES[0]}")
            for suffix, arr in zip(SUFFIXES[1:], (ids, rows.astype(np.int64))):
                _save_npy(self.folder / f"{self.stem}{suffix}", arr)
        except BaseException:
            self.abort()
            raise
        return Segment.open(self.folder, self.stem)

    def abort(self) -> None:
        """Remove what was written (a failed build leaves no segment)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            for p in [self._tmp, *(self.folder / f"{self.stem}{s}" for s in SUFFIXES)]:
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
        self.range_warned = False  # range search has said (a warning, once) that it scores coarse PQ lists from the copies

    @classmethod
    def open(cls, root: Path, stems: list[str], error: float = 0.0) -> RefineStore:
        return cls([Segment.open(root, s) for s in stems], error)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def stems(self) -> list[str]:
        return [s.stem for s in self.segments if s.stem]

    def without(self, drop: np.ndarray, folder: Path | None, prefix: str) -> RefineStore:
        """A store of the same vectors less the ids in ``drop`` (sorted); see :meth:`Segment.without`.
        The errors stay (removing codes never raises them)."""
        segs = [s.without(drop, folder, prefix) for s in self.segments]
        return RefineStore([s for s in segs if s is not None], self.error,
                           None if self.list_errors is None else self.list_errors.copy())

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


def isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a sorted ``sorted_set``, by binary search."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    pos[pos >= len(sorted_set)] = len(sorted_set) - 1
    return sorted_set[pos] == values


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``numpy.save`` to a temporary name, synced, renamed into place."""
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _to_rewrite(seg: Segment) -> bool:
    """Mostly dead rows, or a segment no file names (:meth:`Segment.without` left it for this)."""
    return (seg.nrows > 0 and len(seg) < DEAD_MAX * seg.nrows) or (seg.stem is None and seg._memory is None)


def compact(segments: list[Segment], folder: Path | None, prefix: str = "refine") -> list[Segment]:
    """At most :data:`MAX_SEGMENTS` segments, none mostly dead rows: beyond that many, all but
    the largest are merged into a new one, and a segment whose file holds fewer than
    :data:`DEAD_MAX` live rows joins the merge (written like any segment; the merged ones'
    files are left for the caller to delete)."""
    segments = [s for s in segments if len(s)]
    dead = [i for i, s in enumerate(segments) if _to_rewrite(s)]
    if len(segments) <= MAX_SEGMENTS and not dead:
        return list(segments)
    live = [i for i in range(len(segments)) if i not in dead]
    if len(segments) > MAX_SEGMENTS:  # the largest live one stays, the rest are merged
        keep = [max(live, key=lambda i: len(segments[i]))] if live else []
    else:  # only the mostly dead ones are rewritten
        keep = live
    rest = [s for i, s in enumerate(segments) if i not in keep]
    w = SegmentWriter(sum(len(s) for s in rest), rest[0].dim, folder, prefix)
    try:
        for seg in rest:
            order = np.argsort(seg.rows, kind="stable")  # read the file front to back
            rows, ids = np.asarray(seg.rows)[order], np.asarray(seg.ids)[order]
            for s in range(0, len(seg), LOOKUP_BLOCK):
                w(ids[s:s + LOOKUP_BLOCK], seg.take(rows[s:s + LOOKUP_BLOCK]))
        merged = w.finish()
    except BaseException:
        w.abort()
        raise
    return [segments[i] for i in keep] + [merged]
