"""SQL page: read-only DuckDB over the workspace views, sandboxed to the workspace folder."""

import duckdb
import pandas as pd
import streamlit as st
from curator.app import common
from curator.query import connect, read_only_refusal

MAX_ROWS = 100_000
EXAMPLE = "SELECT image_id, view_position, study_date, edema, pleural_effusion\nFROM images\nORDER BY edema DESC\nLIMIT 20"

st.title("SQL")
ws = common.workspace(require_images=False)
if ws is None:
    st.stop()
st.caption("Views: `images` (catalog + one probability column per finding), `catalog`, `embeddings`, `predictions`, "
           "`errors`, `runs`. Read-only: one SELECT (or EXPLAIN of one) at a time; no file outside the workspace's data "
           "folders can be read, and none can be written.")
query = st.text_area("Query", value=EXAMPLE, height=160, key="sql-query")
run = st.button("Run", type="primary", key="sql-run")
S = st.session_state


def _run(sql: str):
    # A connection of its own per query: nothing a query does reaches the connection the other
    # pages share.
    try:
        con = connect(ws)
    except (duckdb.Error, OSError) as exc:
        return None, str(exc).strip()
    try:
        refusal = read_only_refusal(con, sql)
        if refusal:
            return None, refusal
        # Chunks up to one row past the limit, from the statement as typed (a LIMIT wrapped around
        # it would shift the line numbers of DuckDB's error messages); a DATE stays a date.
        con.execute(sql)
        frames = [con.fetch_df_chunk(4, date_as_object=True)]  # (the first, even empty, gives the columns)
        rows = len(frames[0])
        while 0 < rows <= MAX_ROWS:
            chunk = con.fetch_df_chunk(4, date_as_object=True)
            if not len(chunk):
                break
            frames.append(chunk)
            rows += len(chunk)
        return (pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]), None
    except duckdb.Error as exc:
        return None, str(exc).strip()
    finally:
        con.close()


if run:
    S.sql_result = (query,) + _run(query)
res = S.get("sql_result")
if res is not None:
    sql, df, error = res
    if sql != query:
        st.caption("The query was changed since these results: press Run to run it.")
    if error:
        head, _, rest = error.partition("\n")
        st.error(f"Refused or failed: {head}")
        if rest.strip():
            st.code(rest.strip("\n"), language=None)  # (DuckDB's LINE n: and its ^^^ marker, aligned)
    else:
        if len(df) > MAX_ROWS:
            df = df.iloc[:MAX_ROWS]
            st.warning(f"Only the first {MAX_ROWS:,} rows are shown and downloadable; add a LIMIT or aggregate.")
        st.caption(f"{len(df):,} rows")
        st.dataframe(df, hide_index=True)
        st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name="query.csv", mime="text/csv",
                           on_click="ignore", key="sql-download")
        st.caption("The file holds what the query selects, identifiers included (paths, patient IDs, dates): keep it on "
                   "this machine. A cohort to hand to others is a de-identified export of the Cohort builder.")
