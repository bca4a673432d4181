"""`curator embed --prune`: retire the catalog rows of files that left the archive.

A file deleted from the archive keeps its rows unless the run that walks its folder is asked to
prune: then every current catalog row under a walked folder whose path the walk did not meet is
retired, as a changed file that now fails is (a ``superseded`` row with no successor). Nothing
is deleted: the rows stay in the Parquet parts, the views and the index leave them out, and a
file that comes back is embedded again as a new image.

A folder that looks unmounted or emptied by accident (more than half of the files catalogued
under it gone) is not pruned unless ``force``: the run says so and leaves its rows alone.
Paths are compared as 16-byte MD5 digests (:func:`pipelines.known.path_keys`, DuckDB's
``unhex(md5(path))`` on the workspace side), streamed, so memory is ~16 bytes a walked file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curator.workspace import SUPERSEDED_SCHEMA, Workspace

from .known import _binary16

log = logging.getLogger(__name__)

# more than this share of a folder's catalogued files gone: refuse without force
MAX_GONE_SHARE = 0.5


@dataclass
class PruneReport:
    retired: int = 0
    # folders left alone: (folder, gone, catalogued)
    refused: list[tuple[str, int, int]] = field(default_factory=list)


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), bool)
    pos = np.searchsorted(sorted_set, values)
    pos[pos >= len(sorted_set)] = len(sorted_set) - 1
    return sorted_set[pos] == values


def gone_rows(ws: Workspace, folder: str, seen: np.ndarray, batch_rows: int = 1 << 20) -> tuple[np.ndarray, list[str], int]:
    """(image ids, paths) of the current catalog rows under ``folder`` whose path key is not in
    ``seen`` (sorted ``S16`` digests), and how many current rows lie under it."""
    from curator.query import connect

    prefix = folder.rstrip(os.sep) + os.sep
    con = connect(ws, sandbox=False, use_cache=False)
    ids, paths, total = [], [], 0
    try:
        reader = con.sql("SELECT image_id, path, unhex(md5(path)) AS k FROM catalog WHERE starts_with(path, $p)",
                         params={"p": prefix}).to_arrow_reader(batch_rows)
        for batch in reader:
            total += batch.num_rows
            miss = ~_in_sorted(_binary16(batch.column(2)), seen)
            if miss.any():
                idx = pa.array(np.flatnonzero(miss))
                ids.append(np.asarray(batch.column(0).take(idx).to_numpy(zero_copy_only=False), np.int64))
                paths += batch.column(1).take(idx).to_pylist()
    finally:
        con.close()
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), paths, total


def prune(ws: Workspace, archives: list[str], seen: np.ndarray, run_id: str, force: bool = False) -> PruneReport:
    """Retire the rows of files under the ``archives`` folders that the walk (``seen``: sorted
    digests of every path it met, readable or not) did not meet. Needs the writer lock."""
    rep = PruneReport()
    all_ids: list[np.ndarray] = []
    all_paths: list[str] = []
    for root in archives:
        where = Path(root).expanduser().resolve()
        if not where.is_dir():  # a file given as archive: nothing under it to prune
            continue
        ids, paths, total = gone_rows(ws, str(where), seen)
        if not len(ids):
            continue
        if len(ids) > MAX_GONE_SHARE * total and not force:
            rep.refused.append((str(where), len(ids), total))
            log.warning("%s: %d of the %d files catalogued under it are gone; is the archive fully there (mounted, "
                        "readable)? Not pruned: rerun with --prune-force to retire their rows anyway", where, len(ids), total)
            continue
        all_ids.append(ids)
        all_paths += paths
    if all_ids:
        ids = np.concatenate(all_ids)
        table = pa.table({"image_id": pa.array(ids, pa.int64()), "path": pa.array(all_paths, pa.string()),
                          "superseded_by": pa.nulls(len(ids), pa.int64()), "run_id": pa.array([run_id] * len(ids), pa.string())},
                         schema=SUPERSEDED_SCHEMA)
        ws.commit(add=[ws.write_part("superseded", table)])
        rep.retired = len(ids)
        log.info("pruned: %d catalogued files are no longer in the archive; their rows left the catalog", len(ids))
    return rep
