"""Search page: free text, an example image from the workspace, or an uploaded image."""

import hashlib

import pandas as pd
import streamlit as st
from curator.app import common

from curator.constants import NEGATIVE_TEMPLATE
from curator.search import FilterError, query_modality_note
from curator.workspace import WorkspaceError

S = st.session_state
S.setdefault("search_mode", "text")  # text | similar | upload
S.setdefault("search_similar_to", None)
S.setdefault("search_detail", None)


def _on_text():
    S.search_mode = "text"
    S.search_detail = None


def _on_details(image_id):
    S.search_detail = int(image_id)


def _on_similar(image_id):
    S.search_mode = "similar"
    S.search_similar_to = int(image_id)
    S.search_detail = None


def _on_upload():
    S.search_mode = "upload" if S.get("search_upload") is not None else "text"
    S.search_detail = None


def _use_upload():
    S.search_mode = "upload"
    S.search_detail = None


def _close_details():
    S.search_detail = None


st.title("Search")
# The query box is the first text input of the app; Enter runs the search.
query = st.text_input("Search text", key="search_q", on_change=_on_text,
                      placeholder="e.g. moderate pulmonary edema, small left apical pneumothorax")

ws = common.workspace()
if ws is None:
    st.stop()
searcher = common.searcher(ws)
if searcher is None:
    st.stop()
if searcher.stale:
    st.warning(searcher.stale_reason[:1].upper() + searcher.stale_reason[1:])
if searcher.model_error:
    st.warning(f"Text and upload search are off: {searcher.model_error}. 'More like this' still works.")

findings = common.finding_columns(ws)
c1, c2 = st.columns([1, 4])
k = int(c1.number_input("Results", min_value=1, max_value=500, value=20, step=10, key="search_k"))
shown = c2.multiselect("Probabilities to show", findings, default=common.default_findings(ws), key="search_findings")
contrast = st.toggle("Rank against the negation (“no …”)", key="search_contrast",
                     help="Rank images by the text against “no” + the text: CheXzero's zero-shot contrast with the query as the "
                          "finding. It cancels what the two texts share, which helps a model that ranks by wording; "
                          "the similarity shown is then to the difference of the two text vectors.")

with st.expander("Filters (they restrict the search itself)", expanded=False):
    flt = common.filter_widgets(ws, "search-filter")
with st.expander("Search with an image file", expanded=S.search_mode == "upload"):
    upload = st.file_uploader("PNG, JPEG or DICOM file", key="search_upload", on_change=_on_upload,
                              help="The file is read in memory here and used as the query; it is not added to the workspace.")
if upload is not None and S.search_mode != "upload":  # (a text search since: the file is still loaded)
    st.button("Search with the uploaded file", key="search-use-upload", on_click=_use_upload, icon=":material/upload_file:")

try:
    where = searcher.filter_sql(flt)
    n_pass = searcher.count(flt) if not flt.is_empty() else searcher.images
except FilterError as exc:
    st.error(f"Filter: {exc}")
    st.stop()
if not flt.is_empty():
    st.caption(f"{n_pass:,} of {searcher.images:,} images pass the filters")

# What to search with.
vector, label, exclude, key = None, None, (), None
mode = S.search_mode
if mode == "similar" and S.search_similar_to is not None:
    iid = S.search_similar_to
    st.button("Back to text search", on_click=_on_text)
    try:
        vector = searcher.vector_of(iid)
    except WorkspaceError as exc:
        st.error(str(exc))
        st.stop()
    label, exclude, key = f"images like image {iid}", (iid,), ("similar", iid)
elif mode == "upload" and upload is not None:
    data = upload.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if S.get("search_upload_digest") != digest:
            S.search_upload_vector = searcher.image_vector(data)
            S.search_upload_digest = digest
        vector = S.search_upload_vector
        label, key = "images like the uploaded file", ("upload", digest)
        if note := query_modality_note(ws, data, "the uploaded file"):
            st.warning(note[0].upper() + note[1:] + ".")
    except Exception as exc:  # noqa: BLE001 - an unreadable upload: say why, never crash the page
        st.error(f"Cannot use the uploaded file: {exc}")
        st.stop()
elif query.strip():
    if searcher.model_error:
        st.stop()
    vector = None
    shown_query = query.strip() if len(query.strip()) <= 120 else query.strip()[:117] + "…"  # (a heading, not a page of text)
    label, key = f"“{shown_query}”" + (" against “no …”" if contrast else ""), ("text", query.strip(), contrast)
else:
    st.info("Type what you are looking for and press Enter, or upload an image.")
    st.stop()

cache_key = (id(searcher), key, k, where)
if S.get("search_cache_key") != cache_key:
    by_text = vector is None
    if by_text:
        vector = searcher.text_vector(query, contrast=NEGATIVE_TEMPLATE if contrast else None)
    S.search_results = searcher.search(vector, k, flt, exclude=exclude, text=by_text)
    S.search_cache_key = cache_key
results: pd.DataFrame = S.search_results

st.subheader(f"{len(results)} {label}")
if results.empty:
    st.info("No image passes the filters." if n_pass == 0 else "No results.")
    st.stop()


# Detail view of one image: below the row of the grid that holds it (where the user clicked), or
# above the grid if the results do not hold it.
def _detail_panel(detail: int) -> None:
    row = searcher.details(detail)
    with st.container(border=True):
        if row is None:
            st.error(f"Image {detail} is not in the catalog.")
        else:
            left, right = st.columns([3, 2])
            found, problems = common.thumbnails(ws, [detail], "large")
            if detail in found:
                left.image(found[detail], width="stretch")
            else:
                left.caption(f"no preview: {problems.get(detail, 'unavailable')}")
            with right:
                st.markdown(f"**Image {detail}**")
                b1, b2 = st.columns(2)
                b1.button("More like this", key="detail-mlt", on_click=_on_similar, args=(detail,))
                b2.button("Close", key="detail-close", on_click=_close_details)
                probs = pd.DataFrame({"finding": findings, "probability": [row.get(f) for f in findings]})
                st.dataframe(probs.sort_values("probability", ascending=False), hide_index=True, width="stretch",
                             column_config={"probability": st.column_config.NumberColumn(format="%.3f")})
                meta = common.visible_metadata({k: v for k, v in row.items() if k not in findings})
                st.dataframe(pd.DataFrame({"field": list(meta), "value": [str(v) for v in meta.values()]}),
                             hide_index=True, width="stretch")


detail = S.search_detail
if detail is not None and detail not in set(int(i) for i in results["image_id"]):
    _detail_panel(detail)
    detail = None


def _after_row(ids: list[int]) -> None:
    if detail is not None and detail in ids:
        _detail_panel(detail)


common.image_grid(ws, results, shown, key="res", on_details=_on_details, on_similar=_on_similar, after_row=_after_row)
