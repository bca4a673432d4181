"""Overview page: what the workspace holds, how it was made, what failed."""

import pandas as pd
import streamlit as st
from curator.app import common

from curator.index import read_index_info
from curator.workspace import Workspace

# An error message may quote the file's path (or a folder's), and a path may name the patient:
# the example shown drops the file's own path and anything else that looks like an absolute path.
EXAMPLE_WITHOUT_PATHS = ("regexp_replace(replace(error, path, '<file>'), "
                         "'(^|[\\s''\"(=:,\\[])/[^\\s''\",\\]]+', '\\1<path>', 'g')")

st.title("Overview")
ws = common.workspace(require_images=False)
if ws is None:
    st.stop()


@st.cache_data(show_spinner="Counting…", max_entries=8)
def _summary(root: str, gen: int) -> dict:
    w = Workspace(root)
    cur = common.cursor(w)

    def df(sql):
        return cur.execute(sql).df()

    out = {
        "images": int(cur.execute("SELECT count(*) FROM catalog").fetchall()[0][0]),
        "errors": int(cur.execute("SELECT count(*) FROM errors WHERE coalesce(stage, '') <> 'filter'").fetchall()[0][0]),
        "filtered": int(cur.execute("SELECT count(*) FROM errors WHERE stage = 'filter'").fetchall()[0][0]),
        "by_modality": df("SELECT coalesce(modality, '(not recorded)') AS modality, count(*) AS images FROM catalog GROUP BY 1 ORDER BY 2 DESC"),
        "by_view": df("SELECT coalesce(view_position, '(not recorded)') AS view, count(*) AS images FROM catalog GROUP BY 1 ORDER BY 2 DESC"),
        "by_year": df("SELECT coalesce(CAST(year(study_date) AS VARCHAR), '(not recorded)') AS year, count(*) AS images FROM catalog GROUP BY 1 ORDER BY 1"),
        "by_format": df("SELECT file_format AS format, conversion, count(*) AS images FROM catalog GROUP BY ALL ORDER BY 3 DESC"),
        "errors_by_reason": df(f"SELECT stage, kind AS reason, count(*) AS files, any_value({EXAMPLE_WITHOUT_PATHS}) AS example FROM errors GROUP BY ALL ORDER BY 3 DESC, 1, 2"),
        "runs": df("SELECT run_id, command, status, started, finished, counts FROM runs ORDER BY started DESC LIMIT 50"),
    }
    cols = common.finding_columns(w)
    if cols and out["images"]:
        quoted = ", ".join('"' + c.replace('"', '""') + '"' for c in cols)
        out["histograms"] = df(
            f"SELECT finding, least(CAST(floor(p * 20) AS INTEGER), 19) AS bin, count(*) AS images "
            f"FROM (UNPIVOT (SELECT {quoted} FROM images) ON {quoted} INTO NAME finding VALUE p) "
            f"WHERE p IS NOT NULL GROUP BY ALL ORDER BY 1, 2")
    else:
        out["histograms"] = pd.DataFrame(columns=["finding", "bin", "images"])
    return out


s = _summary(str(ws.root), common.generation(ws))
m = ws.manifest
info = read_index_info(ws)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Images", f"{s['images']:,}")
c2.metric("Unusable files", f"{s['errors']:,}", help="files that could not be read or are not radiographs; files left out on "
          "purpose (the modality filter) are counted apart" + (f": {s['filtered']:,} filtered out" if s["filtered"] else ""))
c3.metric("Checkpoints", len(m.get("ensemble", [])))
c4.metric("Indexed", "no index" if info is None else f"{info.count:,}")
if info is None:
    st.info(f"No search index yet: `curator index --workspace {ws.root}` builds one.")
elif info.count != s["images"]:
    st.warning(f"The index ({info.count:,} images) is older than the catalog ({s['images']:,}): run `curator index --workspace {ws.root}`.")

st.subheader("Images")
if s["images"] == 0:
    st.info("No images yet.")
else:
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**By modality**")
        st.bar_chart(s["by_modality"], x="modality", y="images")
    with c2:
        st.markdown("**By view position**")
        st.bar_chart(s["by_view"], x="view", y="images")
    with c3:
        st.markdown("**By study year**")
        st.bar_chart(s["by_year"], x="year", y="images", sort=False)
    st.dataframe(s["by_format"], hide_index=True)

st.subheader("Probabilities")
hist = s["histograms"]
findings = common.finding_columns(ws)
if hist.empty:
    st.info("No probabilities yet.")
else:
    chosen = st.multiselect("Findings", findings, default=findings, key="overview-findings")
    cols = st.columns(3)
    for i, f in enumerate(chosen):
        h = hist[hist.finding == f].set_index("bin")["images"].reindex(range(20), fill_value=0)
        frame = pd.DataFrame({"probability": [f"{b / 20:.2f}" for b in range(20)], "images": h.to_numpy()})
        with cols[i % 3]:
            st.markdown(f"**{f}**")
            st.bar_chart(frame, x="probability", y="images", sort=False, height=180)

st.subheader("Unusable and filtered-out files by reason")
if s["errors_by_reason"].empty:
    st.caption("none")
else:
    st.dataframe(s["errors_by_reason"], hide_index=True)

st.subheader("Checkpoints and prompt sets")
cks = [{"sha256": sha[:12], "embed_dim": m["checkpoints"].get(sha, {}).get("embed_dim"), "path": m["checkpoints"].get(sha, {}).get("path"),
        "indexed": bool(info and info.checkpoint == sha)} for sha in m.get("ensemble", [])]
st.dataframe(pd.DataFrame(cks, columns=["sha256", "embed_dim", "path", "indexed"]), hide_index=True)
ps = [{"id": k, "name": v.get("name"), "positive": v.get("positive"), "negative": v.get("negative"),
       "columns shown": ", ".join(c for c in v.get("columns", []) if m.get("finding_columns", {}).get(c) == k),
       "labelled_at": v.get("labelled_at")} for k, v in m.get("prompt_sets", {}).items()]
st.dataframe(pd.DataFrame(ps, columns=["id", "name", "positive", "negative", "columns shown", "labelled_at"]), hide_index=True)

st.subheader("Runs")
st.dataframe(s["runs"], hide_index=True)
