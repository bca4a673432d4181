"""What the workspace already holds, for skipping unchanged files: compact, sorted, streamed in.

Every catalogued file and every file that failed before is kept as a 16-byte hash of its path plus
its size and mtime (32 bytes a file: 320 MB for ten million files, where a dict of paths would
take gigabytes). The parts are read one at a time, a few columns each. Lookups are vectorised
binary searches over a chunk of discovered files.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq

from curator.workspace import Workspace

MISSING = np.int64(-1)  # size / mtime of an error row without them (unreadable folder)


def path_keys(paths: list[str]) -> np.ndarray:
    """16-byte blake2b digests of the paths, as a fixed-width bytes array (sortable)."""
    return np.array([hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=16).digest() for p in paths], dtype="S16")


class _Table:
    """Sorted keys with (size, mtime_ns); the last row of a path wins, as in a later part."""

    def __init__(self, keys: list[np.ndarray], sizes: list[np.ndarray], mtimes: list[np.ndarray], ids: list[np.ndarray]):
        k = np.concatenate(keys) if keys else np.zeros(0, "S16")
        s = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        m = np.concatenate(mtimes) if mtimes else np.zeros(0, np.int64)
        i = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(k, kind="stable")  # equal keys keep part order
        k, s, m, i = k[order], s[order], m[order], i[order]
        last = np.ones(len(k), bool)
        last[:-1] = k[1:] != k[:-1]
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


def _int_column(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).fill_null(MISSING).to_numpy(zero_copy_only=False), dtype=np.int64)


class KnownFiles:
    """Catalogued files and files that failed before (``catalog`` and ``errors`` parts).

    Files rejected by the modality filter count as known only while the filter is unchanged
    (``retry_filtered``).
    """

    def __init__(self, ws: Workspace, retry_filtered: bool = False):
        cols: dict[str, tuple[list, list, list, list]] = {"catalog": ([], [], [], []), "errors": ([], [], [], [])}
        for dataset in cols:
            keys, sizes, mtimes, ids = cols[dataset]
            for path in ws.part_paths(dataset):
                names = ["path", "size", "mtime_ns"] + (["stage"] if dataset == "errors" else ["image_id"])
                t = pq.read_table(path, columns=names)
                if dataset == "errors" and retry_filtered:
                    keep = np.asarray(t.column("stage").to_numpy(zero_copy_only=False)) != "filter"
                    t = t.filter(keep)
                keys.append(path_keys(t.column("path").to_pylist()))
                sizes.append(_int_column(t, "size"))
                mtimes.append(_int_column(t, "mtime_ns"))
                ids.append(_int_column(t, "image_id") if dataset == "catalog" else np.full(t.num_rows, MISSING))
        self.catalog = _Table(*cols["catalog"])
        self.errors = _Table(*cols["errors"])

    def classify(self, paths: list[str], sizes: list[int], mtimes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unchanged: catalogued with this size and mtime, known_bad: failed before with them,
        previous: image_id of the path's current catalog row, -1 if none)."""
        keys = path_keys(paths)
        s = np.asarray(sizes, dtype=np.int64)
        m = np.asarray(mtimes, dtype=np.int64)
        unchanged = self.catalog.match(keys, s, m)
        bad = ~unchanged & self.errors.match(keys, s, m)
        found, i = self.catalog.lookup(keys)
        previous = np.where(found, self.catalog.ids[i] if len(self.catalog) else MISSING, MISSING)
        return unchanged, bad, previous

    def unreadable_before(self, path: str) -> bool:
        """An error row for ``path`` without size and mtime exists (an unreadable folder)."""
        return bool(self.errors.match(path_keys([path]), np.array([MISSING]), np.array([MISSING]))[0])
