"""`curator embed --prune`: retire the catalog rows of files that left the archive.

A file deleted from the archive keeps its rows unless the run that walks its folder is asked to
prune: then every current catalog row under a walked folder whose path the walk did not meet is
retired, as a changed file that now fails is (a ``superseded`` row with no successor). Nothing
is deleted: the rows stay in the Parquet parts, the views and the index leave them out, and a
file that comes back is embedded again as a new image.

A folder that looks unmounted or emptied by accident (more than half of the files catalogued
under a folder given as archive, or under one of its immediate subfolders holding at least
:data:`SUBFOLDER_MIN_FILES`, gone) is not pruned
unless ``force``: the run says so and leaves its rows alone. A row is retired only if its file
is really not there (``lstat`` says so): a file the walk could not meet (a folder it could not
list, a symlinked folder it does not follow, a hidden folder given as an archive of its own)
is kept.
Paths are compared as 16-byte MD5 digests (:func:`pipelines.known.path_keys`, DuckDB's
``unhex(md5(path))`` on the workspace side), streamed: 16 bytes a walked file, a few times that
while they are sorted (~0.6 GB at 10M files).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curator.index import _isin_sorted
from curator.workspace import SUPERSEDED_SCHEMA, Workspace, WorkspaceError

from .known import RESOLVED_STAGE, _binary16

log = logging.getLogger(__name__)

# more than this share of a folder's catalogued files gone: refuse without force
MAX_GONE_SHARE = 0.5
# ... for an immediate subfolder of an archive folder, from this many catalogued files on (a
# mounted share holds many; a patient's folder of one or two studies may go whole)
SUBFOLDER_MIN_FILES = 20


@dataclass
class PruneReport:
    retired: int = 0
    # folders left alone: (folder, gone, catalogued)
    refused: list[tuple[str, int, int]] = field(default_factory=list)


def _gone_under(ws: Workspace, folder: str, seen: np.ndarray, batch_rows: int = 1 << 20):
    """Current catalog rows under ``folder`` whose path key is not in ``seen`` and whose file is
    not there (:func:`_really_gone`): (their image ids, the index of their group in ``groups``,
    gone count per group, catalogued count per group). A group is one immediate subfolder of
    ``folder`` ("" for files directly in it). Paths are checked batch by batch and not kept (an
    unmounted root would make millions of strings only to be refused)."""
    from curator.query import connect

    prefix = folder.rstrip(os.sep) + os.sep
    rest = "substr(path, length($p) + 1)"
    group = f"CASE WHEN strpos({rest}, $sep) > 0 THEN split_part({rest}, $sep, 1) ELSE '' END"
    params = {"p": prefix, "sep": os.sep}
    con = connect(ws, sandbox=False, use_cache=False)
    try:
        totals = dict(con.sql(f"SELECT {group} AS g, count(*) FROM catalog WHERE starts_with(path, $p) GROUP BY 1", params=params).fetchall())
        groups = sorted(totals)
        index = {g: j for j, g in enumerate(groups)}
        ids, gidx = [], []
        reader = con.sql(f"SELECT image_id, unhex(md5(path)) AS k, {group} AS g, path FROM catalog WHERE starts_with(path, $p)",
                         params=params).to_arrow_reader(batch_rows)
        for batch in reader:
            miss = ~_isin_sorted(_binary16(batch.column(1)), seen)
            if miss.any():
                mask = pa.array(miss)
                really = np.array([_really_gone(p) for p in batch.column(3).filter(mask).to_pylist()], bool)
                if really.any():
                    ids.append(np.asarray(batch.column(0).filter(mask).to_numpy(zero_copy_only=False), np.int64)[really])
                    gidx.append(np.array([index[g] for g in batch.column(2).filter(mask).to_pylist()], np.int64)[really])
    finally:
        con.close()
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    gidx = np.concatenate(gidx) if gidx else np.zeros(0, np.int64)
    gone = np.bincount(gidx, minlength=len(groups))
    total = np.array([totals[g] for g in groups], np.int64)
    return ids, gidx, groups, gone, total


def _paths_of(ws: Workspace, ids: np.ndarray) -> dict[int, str]:
    from curator.query import connect

    con = connect(ws, sandbox=False, use_cache=False)
    try:
        con.register("wanted", pa.table({"image_id": pa.array(ids, pa.int64())}))
        return dict(con.sql("SELECT image_id, path FROM catalog JOIN wanted USING (image_id)").fetchall())
    finally:
        con.close()


def _really_gone(path: str) -> bool:
    """The file is not there: the path or a folder on it does not exist. Any other error (no
    permission, I/O) counts as there; so do files the walk could not meet (in a folder it could
    not list, behind a symlinked folder it does not follow, in a hidden folder given as archive)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def prune(ws: Workspace, archives: list[str], seen: np.ndarray, run_id: str, force: bool = False) -> PruneReport:
    """Retire the rows of files under the ``archives`` folders that the walk (``seen``: sorted
    digests of every path it met, readable or not) did not meet and that are not there. Needs
    the writer lock.

    Not where more than half of the files catalogued under a folder given as archive, or under
    one of its immediate subfolders, are gone (an unmounted share), unless ``force``. A path
    the walk did not meet is checked with ``lstat`` (one call per such path)."""
    rep = PruneReport()
    if ws.manifest.get("catalog_versions") != "superseded":
        raise WorkspaceError(f"{ws.root}: this workspace predates retired catalog rows (no `superseded` dataset in use): "
                             "--prune cannot retire rows in it; embed the archive into a new workspace to use it")
    candidates: list[np.ndarray] = []
    for root in archives:
        where = Path(root).expanduser().resolve()
        if not where.is_dir():  # a file given as archive: nothing under it to prune
            continue
        ids, gidx, groups, gone, total = _gone_under(ws, str(where), seen)
        if not len(ids):
            continue
        if not force and gone.sum() > MAX_GONE_SHARE * total.sum():
            rep.refused.append((str(where), int(gone.sum()), int(total.sum())))
            continue
        refused = np.zeros(len(groups), bool) if force else (
            (gone > MAX_GONE_SHARE * total) & (total >= SUBFOLDER_MIN_FILES) & (np.array(groups) != ""))
        for j in np.flatnonzero(refused):
            rep.refused.append((str(where / groups[j]), int(gone[j]), int(total[j])))
        candidates.append(ids[~refused[gidx]])
    for folder, gone_n, total_n in rep.refused:
        log.warning("%s: %d of the %d files catalogued under it are gone; is the archive fully there (mounted, readable)? "
                    "Not pruned: rerun with --prune-force to retire their rows anyway", folder, gone_n, total_n)
    ids = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)  # nested roots: once
    if not len(ids):
        return rep
    paths = _paths_of(ws, ids)
    gone_ids = [i for i in ids.tolist() if i in paths]
    table = pa.table({"image_id": pa.array(gone_ids, pa.int64()), "path": pa.array([paths[i] for i in gone_ids], pa.string()),
                      "superseded_by": pa.nulls(len(gone_ids), pa.int64()), "run_id": pa.array([run_id] * len(gone_ids), pa.string())},
                     schema=SUPERSEDED_SCHEMA)
    ws.commit(add=[ws.write_part("superseded", table)])
    rep.retired = len(gone_ids)
    log.info("pruned: %d catalogued files are no longer in the archive; their rows left the catalog", len(gone_ids))
    return rep


# ---------------------------------------------------------------------------------------------
# what the walk says about the workspace beyond new files: catalogued files it did not meet, and
# error rows that no longer hold
# ---------------------------------------------------------------------------------------------
def _roots_condition(archives: list[str]) -> tuple[str, dict]:
    """SQL over ``path`` true for paths under the archive folders or equal to an archive file."""
    terms, params = [], {}
    for j, root in enumerate(archives):
        where = Path(root).expanduser().resolve()
        if where.is_dir():
            params[f"r{j}"] = str(where).rstrip(os.sep) + os.sep
            terms.append(f"starts_with(path, $r{j})")
        else:
            params[f"r{j}"] = str(where)
            terms.append(f"path = $r{j}")
    return "(" + " OR ".join(terms or ["false"]) + ")", params


def _catalog_under(ws: Workspace, archives: list[str], select: str, tail: str = "", params: dict | None = None) -> list[tuple]:
    """``SELECT {select} FROM catalog`` over the current rows of files under the archive folders
    (or that are archive files), ``tail`` added to the WHERE clause; [] without a catalog."""
    from curator.query import connect

    if not ws.part_paths("catalog"):
        return []
    cond, roots = _roots_condition(archives)
    con = connect(ws, sandbox=False, use_cache=False)
    try:
        return con.execute(f"SELECT {select} FROM catalog WHERE {cond} {tail}", {**roots, **(params or {})}).fetchall()
    finally:
        con.close()


def catalogued_under(ws: Workspace, archives: list[str]) -> int:
    """Current catalog rows of files under the archive folders (or that are archive files)."""
    rows = _catalog_under(ws, archives, "count(*)")
    return int(rows[0][0]) if rows else 0


def catalogued_outside_modalities(ws: Workspace, archives: list[str], modalities: list[str]) -> dict[str, int]:
    """Current catalog rows under the archives of DICOM modalities not in ``modalities``, by modality."""
    rows = _catalog_under(ws, archives, "modality, count(*)",
                          "AND modality IS NOT NULL AND NOT list_contains($keep, modality) GROUP BY modality ORDER BY 2 DESC, 1",
                          {"keep": list(modalities)})
    return {m: int(n) for m, n in rows}


def settled_errors(ws: Workspace, archives: list[str], unreadable_now: set[str], seen: np.ndarray | None,
                   refused: list[tuple[str, int, int]] = ()) -> list[dict]:
    """Rows that close the current errors under the archives that no longer hold, after a complete
    walk: a path the walk could not take (stage ``discover``: a folder it could not list, a broken
    link, ...) that it did not meet as such this time (kind ``cleared``); with ``--prune``
    (``seen``: the walk's sorted path digests), a failed file that left the archive (kind ``gone``,
    checked with ``lstat`` as catalogued files are; not under a folder prune refused)."""
    from curator.query import connect

    if not ws.part_paths("errors"):
        return []
    cond, params = _roots_condition(archives)
    con = connect(ws, sandbox=False, use_cache=False)
    try:
        rows = con.execute(f"SELECT path, stage, unhex(md5(path)) AS k FROM errors WHERE {cond}", params).fetchall()
    finally:
        con.close()
    held = [folder.rstrip(os.sep) + os.sep for folder, _, _ in refused]
    met = _isin_sorted(np.array([bytes(k) for _, _, k in rows], "S16"), seen) if seen is not None and rows else None
    out = []
    for j, (path, stage, _) in enumerate(rows):
        if stage == "discover":
            if path not in unreadable_now:
                out.append((path, "cleared", "the walk met this path again without an error"))
        elif met is not None and not met[j] and _really_gone(path) and not any(path.startswith(h) for h in held):
            out.append((path, "gone", "the file left the archive (--prune)"))
    return [{"path": p, "stage": RESOLVED_STAGE, "kind": kind, "error": text, "exception": None, "size": None, "mtime_ns": None}
            for p, kind, text in out]
