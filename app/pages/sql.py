"""SQL page: read-only DuckDB over the workspace views, sandboxed to the workspace folder."""

import duckdb
import streamlit as st
from curator.app import common

MAX_ROWS = 100_000
EXAMPLE = "SELECT image_id, view_position, study_date, edema, pleural_effusion\nFROM images\nORDER BY edema DESC\nLIMIT 20"
ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

st.title("SQL")
ws = common.workspace(require_images=False)
if ws is None:
    st.stop()
st.caption("Views: `images` (catalog + one probability column per finding), `catalog`, `embeddings`, `predictions`, "
           "`errors`, `runs`. Read-only: one SELECT at a time; files outside the workspace cannot be read or written.")
query = st.text_area("Query", value=EXAMPLE, height=160, key="sql-query")
run = st.button("Run", type="primary", key="sql-run")
S = st.session_state


def _run(sql: str):
    cur = common.cursor(ws)
    try:
        statements = cur.extract_statements(sql)
    except duckdb.Error as exc:
        return None, f"{str(exc).strip()}"
    if len(statements) != 1:
        return None, "Run one statement at a time." if statements else "The query is empty."
    if statements[0].type not in ALLOWED:
        return None, f"Only read-only queries (SELECT) can run here, not {statements[0].type.name}."
    try:
        rel = cur.sql(sql)
        if rel is None:
            return None, "The statement returned nothing."
        df = rel.limit(MAX_ROWS + 1).df()
    except duckdb.Error as exc:
        return None, str(exc).strip()
    return df, None


if run:
    S.sql_result = (query,) + _run(query)
res = S.get("sql_result")
if res is not None:
    sql, df, error = res
    if error:
        st.error(f"Refused or failed: {error}")
    else:
        if len(df) > MAX_ROWS:
            df = df.iloc[:MAX_ROWS]
            st.warning(f"Only the first {MAX_ROWS:,} rows are shown and downloadable; add a LIMIT or aggregate.")
        st.caption(f"{len(df):,} rows")
        st.dataframe(df, hide_index=True)
        st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name="query.csv", mime="text/csv",
                           on_click="ignore", key="sql-download")
