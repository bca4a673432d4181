"""DuckDB over a workspace: the views of ``sql/views.sql`` plus the generated ``images`` view.

``images`` is the catalog joined with the latest ensemble probability of every finding labelled
so far: one column per finding, named snake_case(finding), taken from the prompt set that last
labelled that finding (``manifest["finding_columns"]``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa

from curator.constants import ENSEMBLE_MEMBER
from curator.workspace import DATASETS, SCHEMAS, Workspace, WorkspaceError


class QueryError(RuntimeError):
    pass


def sql_text(name: str) -> str:
    """Text of a file shipped under ``sql/`` (e.g. ``"views.sql"``, ``"cohorts/edema.sql"``)."""
    return resources.files("curator.sql").joinpath(name).read_text()


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _empty_relation(schema: pa.Schema) -> str:
    cols = []
    for f in schema:
        cols.append(f"CAST(NULL AS {_duck_type(f.type)}) AS {_ident(f.name)}")
    return f"SELECT {', '.join(cols)} WHERE false"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_date32(t):
        return "DATE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    raise TypeError(t)


def _parquet_relation(paths: list[Path], schema: pa.Schema | None) -> str:
    if not paths:
        if schema is None:
            raise ValueError("no parts and no schema")
        return _empty_relation(schema)
    files = ", ".join(_quote(str(p)) for p in paths)
    return f"SELECT * FROM read_parquet([{files}], union_by_name = true)"


def images_view_sql(ws: Workspace) -> str:
    """SQL of the ``images`` view for the workspace's current manifest."""
    by_set: dict[str, list[str]] = {}
    for col, ps_id in sorted(ws.manifest.get("finding_columns", {}).items()):
        by_set.setdefault(ps_id, []).append(col)
    select = ["c.*"]
    joins = []
    for i, (ps_id, cols) in enumerate(sorted(by_set.items())):
        alias = f"p{i}"
        rel = f"predictions_{ps_id}"
        select += [f"{alias}.{_ident(c)}" for c in cols]
        joins.append(
            f"LEFT JOIN (SELECT image_id, {', '.join(_ident(c) for c in cols)} FROM {rel} "
            f"WHERE member = {_quote(ENSEMBLE_MEMBER)}) AS {alias} ON {alias}.image_id = c.image_id"
        )
    return f"CREATE OR REPLACE VIEW images AS SELECT {', '.join(select)} FROM catalog AS c " + " ".join(joins)


def _damaged(ws: Workspace, what: str) -> WorkspaceError:
    return WorkspaceError(
        f"{ws.root}: {what}. `curator verify -w {ws.root}` lists every damaged part; a predictions part is written again by "
        "`curator label` with its prompt set; lost catalog or embeddings rows come back by embedding the archive into a new "
        "workspace (or from a backup of the part)")


def create_views(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    """The workspace's views on ``con``. A part the manifest lists that is missing or not Parquet
    is a one-line :class:`WorkspaceError` naming it and what to do."""
    for d in DATASETS:
        for p in ws.part_paths(d):
            if not p.is_file():
                raise _damaged(ws, f"{d} part {p.name}, listed in the manifest, is missing")
    try:
        _create_views(con, ws)
    except (duckdb.IOException, duckdb.InvalidInputException) as exc:
        msg = str(exc)
        bad = next((p for d in DATASETS for p in ws.part_paths(d) if str(p) in msg), None)
        if bad is None:
            raise
        raise _damaged(ws, f"{bad.parent.name} part {bad.name} cannot be read ({msg.splitlines()[0][:200]})") from None


def _create_views(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    for d in ("catalog", "embeddings", "errors", "runs", "superseded"):
        con.execute(f"CREATE OR REPLACE VIEW {d}_raw AS {_parquet_relation(ws.part_paths(d), SCHEMAS[d])}")
    con.execute(sql_text("views.sql"))
    if ws.manifest.get("catalog_versions") == "superseded":
        # every replaced row is listed in superseded: no need to rank all rows per path
        con.execute("CREATE OR REPLACE VIEW catalog AS SELECT c.* FROM catalog_raw AS c "
                    "ANTI JOIN superseded_raw AS s ON s.image_id = c.image_id")
    from curator.workspace import PREDICTION_KEY_SCHEMA

    for ps_id in ws.manifest.get("prompt_sets", {}):
        paths = ws.part_paths("predictions", prompt_set=ps_id)
        cols = ws.manifest["prompt_sets"][ps_id]["columns"]
        from curator.workspace import predictions_schema

        rel = _parquet_relation(paths, predictions_schema(cols))
        con.execute(f"CREATE OR REPLACE VIEW predictions_{ps_id} AS {rel}")
    all_preds = ws.part_paths("predictions")
    # the probabilities of the current catalog rows (as `embeddings`: not those of replaced rows)
    con.execute(f"CREATE OR REPLACE VIEW predictions AS SELECT p.* FROM ({_parquet_relation(all_preds, PREDICTION_KEY_SCHEMA)}) AS p "
                "SEMI JOIN catalog AS c ON c.image_id = p.image_id")
    con.execute(images_view_sql(ws))
    # weak labels (<finding>_label = 1 / 0 / -1), only once `curator calibrate` stored thresholds
    from curator.calibrate import labels_view_sql

    labels = labels_view_sql(ws)
    if labels:
        con.execute(labels)


def connect(ws: Workspace, sandbox: bool = True, threads: int | None = None, use_cache: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the workspace views.

    With ``use_cache`` (the default) ``images`` reads the workspace's query cache
    (:mod:`curator.query_cache`) when that matches the manifest, else the Parquet parts.

    With ``sandbox`` (the default) the connection then cannot touch files outside the workspace's
    data folders: ``allowed_directories`` is the part, labelled-set and query-cache folders (so neither ``/etc/passwd`` nor the
    workspace's manifest or de-identification salt can be read), external access is off and the
    configuration is locked.
    """
    con = duckdb.connect(":memory:")
    # Each view over the parts is bound several times while the views are created (catalog under
    # embeddings, errors and images); cache the Parquet footers so each file's is read once.
    con.execute("SET parquet_metadata_cache = true")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    create_views(con, ws)
    if use_cache:
        from curator import query_cache

        query_cache.attach(con, ws)
    if sandbox:
        # The data folders only: not the manifest, the de-identification salt or anything else
        # kept at the workspace's top level.
        from curator.calibrate import TRUTH_DIR
        from curator.query_cache import CACHE_DIR

        folders = ", ".join(_quote(str(ws.root / d) + "/") for d in (*DATASETS, TRUTH_DIR, CACHE_DIR))
        con.execute(f"SET allowed_directories = [{folders}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def char_offsets(text: str, byte_offsets: list[int]) -> list[int]:
    """The character offsets in ``text`` of UTF-8 byte offsets, as DuckDB reports positions
    (tokens, parsed constants): they differ from Python's string offsets after any non-ASCII
    character."""
    if text.isascii():
        return [int(b) for b in byte_offsets]
    import numpy as np

    # the byte offset at which each character starts; a position's character is where its byte is
    widths = np.fromiter((len(ch.encode("utf-8", "surrogatepass")) for ch in text), np.int64, len(text))
    starts = np.concatenate([[0], np.cumsum(widths)])
    return [int(c) for c in np.searchsorted(starts, np.asarray(byte_offsets, np.int64))]


def sql_tokens(text: str) -> list[tuple[int, object]]:
    """DuckDB's tokens of ``text`` as (character offset, kind) (:func:`char_offsets`)."""
    toks = duckdb.tokenize(text)
    return list(zip(char_offsets(text, [pos for pos, _ in toks]), [kind for _, kind in toks]))


def read_only_refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    """Why ``sql`` may not run where only reading is allowed (the app's SQL page); None if it may.

    Allowed: exactly one SELECT, or one EXPLAIN [ANALYZE] of a SELECT. The statement type alone is
    not enough: ``EXPLAIN ANALYZE`` runs the statement it explains, so ``EXPLAIN ANALYZE COPY ...``
    would write files, and the explained statement is checked too.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        return str(exc).strip()
    if len(statements) != 1:
        return "Run one statement at a time." if statements else "The query is empty."
    kind = statements[0].type
    if kind == duckdb.StatementType.SELECT:
        return None
    if kind == duckdb.StatementType.EXPLAIN:
        words = [(pos, sql[pos:].split(None, 1)[0].upper()) for pos, t in sql_tokens(sql) if t != duckdb.token_type.comment]
        rest = 1 + (len(words) > 1 and words[1][1] in ("ANALYZE", "ANALYSE"))
        if words and words[0][1] == "EXPLAIN" and len(words) > rest:
            try:
                inner = con.extract_statements(sql[words[rest][0]:])
            except duckdb.Error:
                inner = []
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                return None
        return "Only read-only queries can run here: EXPLAIN of a SELECT, not of another statement."
    return f"Only read-only queries (SELECT) can run here, not {kind.name}."


def reads_query_cache(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether this connection's ``images`` view reads the query cache (not the Parquet parts)."""
    from curator.query_cache import CACHE_ALIAS

    row = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'images' AND NOT internal").fetchone()
    return row is not None and f"{CACHE_ALIAS}." in row[0]


def run_query(ws: Workspace, query: str, params: dict | None = None, sandbox: bool = True, attempts: int = 3):
    """Run ``query`` against the workspace's current views; return a pandas DataFrame.

    The manifest is re-read first. If a writer replaced a part between that read and the query
    (a relabel moves old parts to the trash), the query is retried on the newer manifest.
    """
    for name in params or {}:
        if not name.isidentifier():
            raise QueryError(f"bad variable name {name!r}")
    for attempt in range(attempts):
        ws.reload()
        con = None
        try:
            con = connect(ws, sandbox=sandbox)
            for name, value in (params or {}).items():
                con.execute(f"SET VARIABLE {name} = ?", [value])
            result = con.execute(query)
            if result is None:  # nothing to run: an empty query or only comments
                raise QueryError("the query is empty (no SQL statement in it)")
            return result.df()
        except duckdb.IOException as exc:
            if attempt + 1 < attempts and _missing_file(exc):
                continue
            raise QueryError(str(exc).strip()) from None
        except duckdb.Error as exc:
            raise QueryError(str(exc).strip()) from None
        finally:
            if con is not None:
                con.close()


def _missing_file(exc: Exception) -> bool:
    text = str(exc)
    return "No files found" in text or "No such file" in text or "does not exist" in text
