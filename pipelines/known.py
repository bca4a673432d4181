"""What the workspace already holds, for skipping unchanged files: compact, sorted, streamed in.

Every catalogued file and every file that failed before is kept as a 16-byte hash (MD5) of its
path plus its size and mtime (32 bytes a file: 320 MB for ten million files, where a dict of
paths would take gigabytes). DuckDB reads the parts' few columns and hashes the paths, streaming
batches of rows; discovered paths are hashed with hashlib to the same digest. Lookups are
vectorised binary searches over a chunk of discovered files.
"""

from __future__ import annotations

import hashlib

import numpy as np

from curator.workspace import Workspace

MISSING = np.int64(-1)  # size / mtime of an error row without them (unreadable folder)
# The stage of the errors rows that close an earlier error of a path (pipelines.prune.settled_errors;
# the errors view leaves the path out while such a row is its latest).
RESOLVED_STAGE = "resolved"
CLOSED = np.int64(-2)  # size / mtime of a row closing a path's errors (RESOLVED_STAGE): matches no file

# Read errors that say more about the machine than about the file (no permission, an I/O error,
# the file gone before it was read, memory short): the file is read again by every run, not
# skipped as known bad while its size and mtime stay the same. (`curator embed --retry-errors`
# reads every file that failed before again.)
TRANSIENT_KINDS = ("unreadable", "vanished", "out_of_memory")


def path_keys(paths: list[str]) -> np.ndarray:
    """16-byte MD5 digests of the paths' UTF-8 bytes, as a fixed-width bytes array (sortable).

    The same digest as DuckDB's ``unhex(md5(path))``, which computes the workspace side (see
    :func:`_stored_keys`). MD5 is a fingerprint here, not a security measure.
    """
    return np.array([hashlib.md5(p.encode("utf-8", "surrogateescape"), usedforsecurity=False).digest() for p in paths], dtype="S16")


def _binary16(col) -> np.ndarray:
    """An Arrow binary column of 16-byte values as an ``S16`` array (no per-value Python objects)."""
    import pyarrow as pa

    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if len(col) == 0:
        return np.zeros(0, "S16")
    if col.null_count:
        raise ValueError("a path without a value")
    _, offsets, data = col.buffers()
    off = np.frombuffer(offsets, dtype=np.int64 if col.type == pa.large_binary() else np.int32)[col.offset: col.offset + len(col) + 1]
    if not (np.diff(off) == 16).all():
        raise ValueError("expected 16-byte digests")
    return np.frombuffer(data, dtype="S16", count=len(col), offset=int(off[0])).copy()


def superseded_ids(ws, retired_only: bool = False) -> np.ndarray:
    """Sorted ids of catalog rows that are no longer current: replaced by a newer version of the
    file, or (``retired_only``: only these) retired without a successor (it changed, then failed)."""
    files = [str(p) for p in ws.part_paths("superseded")]
    if not files:
        return np.zeros(0, np.int64)
    import duckdb

    where = "WHERE superseded_by IS NULL" if retired_only else ""
    con = duckdb.connect(":memory:")
    try:
        got = con.execute(f"SELECT DISTINCT image_id FROM read_parquet($f) {where} ORDER BY 1", {"f": files}).fetchnumpy()["image_id"]
    finally:
        con.close()
    return np.asarray(got, dtype=np.int64)


def _stored_keys(files: list[str], errors: bool, retry_filtered: bool, retry_errors: bool = False, batch_rows: int = 1 << 20):
    """(keys, sizes, mtimes, ids) of the parts' rows, in part order, hashed by DuckDB in batches.

    Error rows of :data:`TRANSIENT_KINDS` are left out (their files are read again), and so are
    the modality filter's (``retry_filtered``) or every read error (``retry_errors``); the walk's
    rows (stage ``discover``) stay: they say a path was recorded as unreadable already, and so
    do the rows closing a path's errors (stage ``resolved``, :data:`CLOSED`).
    DuckDB reads the parts and computes the digests in C++ on every core (a Python loop over ten
    million paths took ~20 s); the rows stream in batches, so memory stays at 32 bytes a file.
    """
    import duckdb

    id_col = "-1::BIGINT" if errors else "image_id"
    where = ""
    size, mtime = f"coalesce(size, {int(MISSING)})", f"coalesce(mtime_ns, {int(MISSING)})"
    if errors:
        retried = [f"coalesce(kind, '') IN ({', '.join(repr(k) for k in TRANSIENT_KINDS)})"]
        if retry_filtered:
            retried.append("coalesce(stage, '') = 'filter'")
        if retry_errors:
            retried = ["true"]
        where = f"WHERE coalesce(stage, '') IN ('discover', '{RESOLVED_STAGE}') OR NOT (" + " OR ".join(retried) + ")"
        # a closing row wins over the path's earlier rows (it comes later) and matches nothing
        size, mtime = (f"CASE WHEN stage = '{RESOLVED_STAGE}' THEN {int(CLOSED)} ELSE {c} END" for c in (size, mtime))
    con = duckdb.connect(":memory:")
    try:
        # (insertion order is preserved: a later part's row for a path still comes later)
        reader = con.sql(
            f"SELECT unhex(md5(path)) AS k, {size} AS s, {mtime} AS m, "
            f"coalesce({id_col}, {int(MISSING)}) AS i FROM read_parquet($files, union_by_name = true) {where}", params={"files": files}).to_arrow_reader(batch_rows)
        out: tuple[list, list, list, list] = ([], [], [], [])
        for batch in reader:
            cols = [_binary16(batch.column(0))] + [np.asarray(batch.column(j).to_numpy(zero_copy_only=False), dtype=np.int64) for j in (1, 2, 3)]
            for j in range(4):
                out[j].append(cols[j])
        return out
    finally:
        con.close()


class _Table:
    """Sorted keys with (size, mtime_ns); the last row of a path wins, as in a later part. A path
    whose winning row is in ``drop_ids`` (retired: the file changed and failed, or left the
    archive) has no entry: an older row of it must not win instead (a file restored from a backup
    with its old size and mtime would match that row and be skipped, with no current row)."""

    def __init__(self, keys: list[np.ndarray], sizes: list[np.ndarray], mtimes: list[np.ndarray], ids: list[np.ndarray],
                 drop_ids: np.ndarray | None = None):
        k = np.concatenate(keys) if keys else np.zeros(0, "S16")
        s = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        m = np.concatenate(mtimes) if mtimes else np.zeros(0, np.int64)
        i = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(k, kind="stable")  # equal keys keep part order
        k, s, m, i = k[order], s[order], m[order], i[order]
        last = np.ones(len(k), bool)
        last[:-1] = k[1:] != k[:-1]
        if drop_ids is not None and len(drop_ids):
            last &= ~np.isin(i, drop_ids)
        self.keys, self.sizes, self.mtimes, self.ids = k[last], s[last], m[last], i[last]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, row index) of each key."""
        if not len(self.keys) or not len(keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[i] == keys, i

    def match(self, keys: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray) -> np.ndarray:
        """True where the path is in the table with exactly this size and mtime."""
        found, i = self.lookup(keys)
        if not len(self.keys):
            return found
        return found & (self.sizes[i] == sizes) & (self.mtimes[i] == mtimes)


class KnownFiles:
    """Catalogued files and files that failed before (``catalog`` and ``errors`` parts).

    Files rejected by the modality filter count as known only while the filter is unchanged
    (``retry_filtered``); files that failed for a reason of :data:`TRANSIENT_KINDS` never do,
    and with ``retry_errors`` no file that failed to read does.
    """

    def __init__(self, ws: Workspace, retry_filtered: bool = False, retry_errors: bool = False):
        tables = {}
        retired = superseded_ids(ws, retired_only=True)
        for dataset in ("catalog", "errors"):
            files = [str(p) for p in ws.part_paths(dataset)]
            drop = retired if dataset == "catalog" else None
            tables[dataset] = _Table(*_stored_keys(files, dataset == "errors", retry_filtered, retry_errors), drop_ids=drop) if files else _Table([], [], [], [])
        self.catalog = tables["catalog"]
        self.errors = tables["errors"]

    def classify(self, paths: list[str], sizes: list[int], mtimes: list[int], keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unchanged: catalogued with this size and mtime, known_bad: failed before with them and
        without a current catalog row, previous: image_id of the path's current catalog row, -1 if
        none). ``keys``: the paths' :func:`path_keys`, when the caller has them already."""
        keys = path_keys(paths) if keys is None else keys
        s = np.asarray(sizes, dtype=np.int64)
        m = np.asarray(mtimes, dtype=np.int64)
        unchanged = self.catalog.match(keys, s, m)
        found, i = self.catalog.lookup(keys)
        # A path with a current catalog row of another version changed since that row: it is read
        # again even if an older error row matches it (a failed version restored, e.g. `cp -p` from
        # a backup), so that the row is retired and the error shown, not the stale row kept.
        bad = ~found & self.errors.match(keys, s, m)
        previous = np.where(found, self.catalog.ids[i] if len(self.catalog) else MISSING, MISSING)
        return unchanged, bad, previous

    def unreadable_before(self, path: str) -> bool:
        """An error row for ``path`` without size and mtime exists (an unreadable folder)."""
        return bool(self.errors.match(path_keys([path]), np.array([MISSING]), np.array([MISSING]))[0])
