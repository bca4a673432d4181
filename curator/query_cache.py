"""The query cache: the ``images`` view materialised in a DuckDB file, for large workspaces.

``images`` is the catalog joined with the ensemble's probabilities, read from Parquet parts on
every query. At millions of images that join costs more than a second per query (DuckDB decodes
the catalog's strings for every row a metadata filter keeps, and builds a hash table on them);
the same rows in DuckDB's own storage, sorted by ``image_id``, answer a cohort query several
times faster. The cache is derived data, never the source of truth:

- ``W/cache/images.duckdb`` holds the table ``images`` (exactly the view's columns and rows) and
  ``cache_info`` with the *source key*: a hash of everything the view reads (the catalog,
  superseded and prediction part files, the finding-to-prompt-set map and the view SQL).
- :func:`curator.query.connect` uses the file only when its key equals the key of the manifest
  it has just read; otherwise queries read the Parquet parts as before. A stale, missing,
  half-written or unreadable cache therefore changes nothing but speed.
- It is refreshed (temporary file, then rename) by the writers that change what ``images``
  shows (``curator embed``, ``curator label``) when the workspace has ``AUTO_ROWS`` images or
  more, or when someone asked for it with ``curator cache``; ``curator cache --off`` removes it
  and stops the refreshes. After an ``embed`` (parts only added) a copy is updated with the new
  and replaced rows; otherwise it is built whole. Refreshing needs the writer lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

from curator.workspace import Workspace, WorkspaceError

log = logging.getLogger("curator.query_cache")

CACHE_DIR = "cache"
CACHE_FILE = "images.duckdb"
CACHE_ALIAS = "images_cache"
FORMAT = 1
# Below this many catalog rows the Parquet view answers in well under a second; no cache is built
# unless asked for.
AUTO_ROWS = 1_000_000
# Memory DuckDB may use while building (it spills to W/cache/spill beyond that).
BUILD_MEMORY = "1GB"
MODES = ("auto", "on", "off")
# image ids per step of the build
CHUNK_IDS = 1_000_000


@dataclass
class CacheStatus:
    path: Path
    exists: bool
    fresh: bool
    rows: int | None = None
    built_at: str | None = None
    build_s: float | None = None
    how: str | None = None  # "full" or "incremental": how the last build or update was made
    size_bytes: int | None = None
    mode: str = "auto"


def cache_path(ws: Workspace) -> Path:
    return ws.root / CACHE_DIR / CACHE_FILE


def mode(ws: Workspace) -> str:
    """``auto`` (default: cache from AUTO_ROWS images), ``on`` (asked for) or ``off``."""
    m = ws.manifest.get("query_cache", "auto")
    return m if m in MODES else "auto"


def sources(ws: Workspace) -> dict:
    """What the ``images`` view reads under the workspace's current manifest."""
    from curator.query import images_view_sql, sql_text

    finding_sets = set(ws.manifest.get("finding_columns", {}).values())
    return {
        "format": FORMAT,
        "duckdb": duckdb.__version__,
        "views": sql_text("views.sql"),
        "images": images_view_sql(ws),
        "catalog_versions": ws.manifest.get("catalog_versions"),
        "catalog": [e["file"] for e in ws.part_entries("catalog")],
        "superseded": [e["file"] for e in ws.part_entries("superseded")],
        "predictions": [e["file"] for e in ws.part_entries("predictions") if e.get("prompt_set") in finding_sets],
    }


def source_key(ws: Workspace) -> str:
    """Hash of :func:`sources`: the cache is used only when its key equals this."""
    return _key(sources(ws))


def _key(src: dict) -> str:
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def _only_added(old: dict, new: dict) -> bool:
    """True when ``new`` differs from ``old`` only by added parts (what `embed` does)."""
    if any(old.get(k) != new.get(k) for k in ("format", "duckdb", "views", "images", "catalog_versions")):
        return False
    return all(k in old and set(old[k]) <= set(new[k]) for k in ("catalog", "superseded", "predictions"))


def catalog_rows(ws: Workspace) -> int:
    """Catalog rows listed in the manifest (all versions; no file is read)."""
    return sum(int(e.get("rows", 0)) for e in ws.part_entries("catalog"))


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _read_info(con: duckdb.DuckDBPyConnection, alias: str) -> dict | None:
    try:
        row = con.execute(f"SELECT source_key, format, rows, built_at, build_s, sources, next_image_id, how FROM {alias}.cache_info").fetchone()
    except duckdb.Error:
        return None
    if row is None:
        return None
    return dict(zip(("source_key", "format", "rows", "built_at", "build_s", "sources", "next_image_id", "how"), row))


def attach(con: duckdb.DuckDBPyConnection, ws: Workspace) -> bool:
    """Attach the cache read-only and point ``images`` at it, if it matches ``ws``'s manifest.

    Returns False (and leaves the connection as it was) when there is no usable cache.
    """
    path = cache_path(ws)
    if not path.is_file() or mode(ws) == "off":
        return False
    try:
        con.execute(f"ATTACH {_quote(str(path))} AS {CACHE_ALIAS} (READ_ONLY)")
    except duckdb.Error as exc:  # half-copied, from a newer DuckDB, damaged: the Parquet view serves
        log.debug("query cache %s not attached: %s", path, exc)
        return False
    info = _read_info(con, CACHE_ALIAS)
    if info is None or info["format"] != FORMAT or info["source_key"] != source_key(ws):
        con.execute(f"DETACH {CACHE_ALIAS}")
        return False
    con.execute(f"CREATE OR REPLACE VIEW images AS SELECT * FROM {CACHE_ALIAS}.images")
    return True


def status(ws: Workspace) -> CacheStatus:
    path = cache_path(ws)
    st = CacheStatus(path=path, exists=path.is_file(), fresh=False, mode=mode(ws))
    if not st.exists:
        return st
    st.size_bytes = path.stat().st_size
    info = _previous_info(ws)
    if info:
        st.rows, st.built_at, st.build_s, st.how = info["rows"], info["built_at"], info["build_s"], info["how"]
        st.fresh = info["format"] == FORMAT and info["source_key"] == source_key(ws)
    return st


def clean(ws: Workspace) -> None:
    """Remove temporary build files and spill left by a killed build (call with the writer lock)."""
    folder = ws.root / CACHE_DIR
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()
    shutil.rmtree(folder / "spill", ignore_errors=True)


def refresh(ws: Workspace, force: bool = False, memory_limit: str = BUILD_MEMORY, chunk_ids: int = CHUNK_IDS) -> CacheStatus:
    """Build the cache for ``ws``'s current manifest unless it is already fresh.

    When the workspace only gained parts since the cache was built (an `embed` run: new catalog,
    prediction and superseded parts, nothing removed or relabelled), a copy of the cache is
    updated instead: replaced rows deleted, rows with ids from the cached ``next_image_id`` on
    inserted, and the row count checked against the Parquet ``catalog`` view (a full build on
    any mismatch). Otherwise (or with ``force``) it is built whole.

    The caller holds the writer lock (so no part it reads is replaced meanwhile). The file is
    made under a temporary name and renamed into place: readers see the old file, the new one
    or none, and fall back to Parquet whenever the key does not match.
    """
    src = sources(ws)
    prev = _previous_info(ws) if cache_path(ws).is_file() else None
    if prev and prev["format"] == FORMAT and prev["source_key"] == _key(src) and not force:
        return status(ws)
    folder = ws.root / CACHE_DIR
    folder.mkdir(exist_ok=True)
    clean(ws)
    if prev and not force and prev.get("sources") and prev.get("next_image_id") is not None \
            and _only_added(json.loads(prev["sources"]), src):
        if _build(ws, src, memory_limit, chunk_ids, base=prev):
            return status(ws)
        log.info("query cache: the incremental update did not match the catalog; building it whole")
    _build(ws, src, memory_limit, chunk_ids, base=None)
    return status(ws)


def _previous_info(ws: Workspace) -> dict | None:
    try:
        con = duckdb.connect(str(cache_path(ws)), read_only=True)
    except duckdb.Error:
        return None
    try:
        return _read_info(con, "main")
    finally:
        con.close()


def _build(ws: Workspace, src: dict, memory_limit: str, chunk_ids: int, base: dict | None) -> bool:
    """Write the cache for ``src``: whole, or (``base``: the current file's info) by updating a copy.

    Returns False when an incremental update's row count disagrees with the catalog (nothing is
    replaced then).
    """
    from curator.query import connect

    folder = ws.root / CACHE_DIR
    tmp = folder / f".images-{uuid.uuid4().hex[:12]}.tmp.duckdb"
    t0 = time.perf_counter()
    con = connect(ws, sandbox=False, use_cache=False)
    ok = True
    try:
        con.execute(f"SET memory_limit = {_quote(memory_limit)}")
        con.execute(f"SET temp_directory = {_quote(str(folder / 'spill'))}")
        next_id = int(ws.manifest.get("next_image_id", 0))
        if base is None:
            start = None
            con.execute(f"ATTACH {_quote(str(tmp))} AS build")
            # Sorted by image_id (lookups by id skip blocks by their zone maps), built one id range
            # at a time: each range's join and sort touch only the parts' row groups whose id
            # statistics overlap it, so memory does not grow with the archive.
            con.execute("CREATE TABLE build.images AS SELECT * FROM images WHERE false")
        else:
            start = int(base["next_image_id"])
            shutil.copyfile(cache_path(ws), tmp)
            con.execute(f"ATTACH {_quote(str(tmp))} AS build")
            # rows a changed file replaced (every superseded id; those already gone cost nothing)
            con.execute("DELETE FROM build.images WHERE image_id IN (SELECT image_id FROM superseded_raw)")
            con.execute("DROP TABLE build.cache_info")
        lo, hi = con.execute("SELECT min(image_id), max(image_id) FROM catalog_raw" + ("" if start is None else f" WHERE image_id >= {start}")).fetchone()
        if lo is not None:
            for a in range(int(lo), int(hi) + 1, chunk_ids):
                con.execute("INSERT INTO build.images SELECT * FROM images WHERE image_id >= ? AND image_id < ? ORDER BY image_id",
                            [a, a + chunk_ids])
        rows = con.execute("SELECT count(*) FROM build.images").fetchone()[0]
        if base is not None and rows != con.execute("SELECT count(*) FROM catalog").fetchone()[0]:
            ok = False
        else:
            build_s = time.perf_counter() - t0
            con.execute(
                "CREATE TABLE build.cache_info AS SELECT ?::VARCHAR AS source_key, ?::INTEGER AS format, ?::BIGINT AS rows, "
                "?::VARCHAR AS built_at, ?::DOUBLE AS build_s, ?::VARCHAR AS sources, ?::BIGINT AS next_image_id, ?::VARCHAR AS how",
                [_key(src), FORMAT, rows, time.strftime("%Y-%m-%dT%H:%M:%S%z"), build_s, json.dumps(src, sort_keys=True), next_id,
                 "full" if base is None else "incremental"],
            )
        con.execute("DETACH build")
        if ok:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, cache_path(ws))
    except BaseException as exc:
        ok = False
        if isinstance(exc, duckdb.Error):  # out of memory or disk, say: one line, nothing half-made kept
            raise WorkspaceError(f"query cache not built: {str(exc).strip().splitlines()[0]}") from None
        raise
    finally:
        con.close()
        if not ok:
            with contextlib.suppress(OSError):
                tmp.unlink()
        shutil.rmtree(folder / "spill", ignore_errors=True)
        for p in folder.glob(tmp.name + ".*"):  # a WAL DuckDB may have left beside the temporary file
            with contextlib.suppress(OSError):
                p.unlink()
    return ok


def drop(ws: Workspace) -> bool:
    """Delete the cache file; True when there was one."""
    clean(ws)
    try:
        cache_path(ws).unlink()
    except FileNotFoundError:
        return False
    return True


def wanted(ws: Workspace) -> bool:
    m = mode(ws)
    if m == "off":
        return False
    return m == "on" or cache_path(ws).exists() or catalog_rows(ws) >= AUTO_ROWS


def after_write(ws: Workspace) -> CacheStatus | None:
    """Called by writers (holding the lock) once they committed: rebuild the cache when wanted.

    A failure to build is logged, not raised: the committed work stands and queries read Parquet.
    """
    if not wanted(ws):
        return None
    log.info("refreshing the query cache (%s catalog rows) ...", f"{catalog_rows(ws):,}")
    try:
        st = refresh(ws)
    except Exception as exc:  # noqa: BLE001 - the run's own work is committed; say why and go on
        log.warning("query cache not refreshed (%s: %s); queries read the Parquet parts until `curator cache` rebuilds it",
                    type(exc).__name__, exc)
        return None
    log.info("query cache: %s rows in %.1f s", f"{st.rows:,}" if st.rows is not None else "?", st.build_s or 0.0)
    return st


def describe(st: CacheStatus) -> str:
    """One line for people: where the cache is and whether queries use it."""
    if not st.exists:
        tail = "off: embed and label will not build one" if st.mode == "off" else (
            "built by `curator cache`, or by embed/label from {:,} images".format(AUTO_ROWS))
        return f"query cache: none ({tail})"
    size = f"{st.size_bytes / 1e6:,.1f} MB" if st.size_bytes is not None else "? MB"
    rows = f"{st.rows:,} images" if st.rows is not None else "unreadable"
    built = f", {'updated' if st.how == 'incremental' else 'built'} {st.built_at} in {st.build_s:.1f} s" if st.built_at and st.build_s is not None else ""
    state = "current: queries on `images` read it" if st.fresh else \
        "STALE: queries read the Parquet parts (`curator cache` or the next embed/label rebuilds it)"
    return f"query cache: {st.path} ({rows}, {size}{built}); {state}"
