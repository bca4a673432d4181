"""What the app's pages (``views/``) share: which workspace, the resources loaded once per process, widgets.

The app holds no logic of its own: searching is :class:`curator.search.Searcher`, thumbnails are
:mod:`curator.thumbnails`, SQL is :func:`curator.query.connect` (sandboxed), cohorts are
:mod:`curator.cohort`. This module only wires them to Streamlit.

The workspace comes from ``--workspace W`` after ``--`` on the ``streamlit run`` line (``curator
app`` passes it) or from the ``CURATOR_WORKSPACE`` environment variable.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from curator import query_cache
from curator.appserver import ENV_LAUNCHED, is_loopback
from curator.deid import AGE_CAP, SAFE_COLUMNS
from curator.index import read_index_info
from curator.query import connect
from curator.search import Searcher, SearchFilter
from curator.thumbnails import get_thumbnails
from curator.workspace import Workspace, WorkspaceError

ENV_WORKSPACE = "CURATOR_WORKSPACE"
ENV_DEVICE = "CURATOR_DEVICE"
ENV_EXPORTS = "CURATOR_EXPORTS"

# The catalog fields the detail view shows: the columns a de-identified export keeps (no source
# path, which may name the patient, no UIDs, no institution) and the study's year (from
# study_date: a full date identifies, so the screens show what the export keeps, the year).
# An allow-list, so a column added to the catalog later stays hidden until it is listed here.
SHOWN_COLUMNS = ("image_id", *SAFE_COLUMNS, "study_year")
NOT_RECORDED = "(not recorded)"
GRID_COLUMNS = 5
PREFERRED_FINDINGS = ("pleural_effusion", "edema", "cardiomegaly", "pneumothorax", "consolidation", "atelectasis")


# -- which workspace ----------------------------------------------------------------------------
def _argv_value(name: str) -> str | None:
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def workspace_root() -> str | None:
    return _argv_value("--workspace") or os.environ.get(ENV_WORKSPACE) or None


def device() -> str | None:
    return _argv_value("--device") or os.environ.get(ENV_DEVICE) or None


# The pages' input widgets (not buttons or file uploads, whose state cannot be set): their values
# survive a visit to another page (see keep_widget_state).
_FILTER_FIELDS = ("view", "modality", "sex", "age", "from", "to", "cond")
KEPT_WIDGETS = frozenset({
    "search_q", "search_k", "search_findings", "search_contrast", *(f"search-filter-{f}" for f in _FILTER_FIELDS),
    "cohort-name", "cohort-use-labels", "cohort-finding", "cohort-threshold", "cohort-absent", "cohort-absent-threshold",
    "cohort-condition", "cohort-sql", "cohort-one-per", "cohort-sampling", "cohort-limit", "cohort-npos", "cohort-nneg",
    "cohort-nany", "cohort-split", "cohort-deid", "cohort-copy", *(f"cohort-filter-{f}" for f in _FILTER_FIELDS),
    "sql-query",
})  # (not the overview's findings: untouched, they follow the workspace's findings as they change)


def keep_widget_state() -> None:
    """Hand the pages' widget values back to the session state on every run: Streamlit forgets the
    state of a widget that a run does not draw, so without this a query, a half-built cohort or
    its filters would be gone after a look at another page."""
    from streamlit import config

    # (a widget with a default value whose state is also set this way makes Streamlit log a warning
    # with a stack trace, about a duplication that is intended here; `curator app` passes it too)
    config.set_option("global.disableWidgetStateDuplicationWarning", True)
    for k in KEPT_WIDGETS & set(st.session_state.keys()):
        st.session_state[k] = st.session_state[k]


def refuse_if_unsafe() -> bool:
    """Show why the app does not run on this server, if it should not (see
    :func:`unsafe_server_settings`); True then."""
    unsafe = unsafe_server_settings()
    if unsafe:
        st.error("This app shows a hospital archive's images, so it does not run while " + " and ".join(unsafe) + ". "
                 "Start it with `curator app --workspace W` (this machine only; `--host` to serve a network), or add "
                 "`--server.address 127.0.0.1 --browser.gatherUsageStats false` to the `streamlit run` line.")
    return bool(unsafe)


def workspace(require_images: bool = True) -> Workspace | None:
    """The workspace (manifest re-read on every run), or None after telling the user what to do.
    Every page asks for it first, so every page refuses on a server that breaks the app's promises
    (also a page script served on its own)."""
    if refuse_if_unsafe():
        return None
    root = workspace_root()
    if not root:
        st.info("No workspace given. Start the app with `curator app --workspace W` "
                f"(or set {ENV_WORKSPACE}=W before `streamlit run`).")
        return None
    try:
        ws = Workspace(root)
    except WorkspaceError as exc:
        st.error(str(exc))
        return None
    if not ws.exists:
        st.info(f"`{ws.root}` is not a curator workspace yet (no manifest.json). Create it with "
                f"`curator embed /path/to/archive --workspace {ws.root} --checkpoint CK.pt`.")
        return None
    if require_images and ws.row_count("catalog") == 0:
        st.info(f"The workspace `{ws.root}` holds no images yet. Add some with "
                f"`curator embed /path/to/archive --workspace {ws.root} --checkpoint CK.pt`.")
        return None
    return ws


def generation(ws: Workspace) -> int:
    return int(ws.manifest.get("generation", 0))


def finding_columns(ws: Workspace) -> list[str]:
    return sorted(ws.manifest.get("finding_columns", {}))


def default_findings(ws: Workspace, n: int = 3) -> list[str]:
    cols = finding_columns(ws)
    preferred = [c for c in PREFERRED_FINDINGS if c in cols]
    return (preferred + [c for c in cols if c not in preferred])[:n]


# -- resources loaded once per process ----------------------------------------------------------
@st.cache_resource(show_spinner="Opening the workspace…", max_entries=4)
def _connection(root: str, gen: int, cache_stamp: int):
    """A sandboxed DuckDB connection with the workspace views (per manifest generation and query
    cache file: a writer rebuilds the cache just after its commit)."""
    return connect(Workspace(root))


def _cache_stamp(ws: Workspace) -> int:
    try:
        return query_cache.cache_path(ws).stat().st_mtime_ns
    except OSError:
        return 0


_local = threading.local()


def cursor(ws: Workspace):
    """This thread's cursor on the process's sandboxed connection (DuckDB: one cursor per thread)."""
    con = _connection(str(ws.root), generation(ws), _cache_stamp(ws))
    held = getattr(_local, "held", None)
    if held is None or held[0] is not con:
        held = _local.held = (con, con.cursor())
    return held[1]


@st.cache_resource(show_spinner="Loading the index and the model…", max_entries=1)
def _searcher(root: str, gen: int, index_stamp: str, device_name: str | None):
    return Searcher(Workspace(root), device=device_name)


def searcher(ws: Workspace) -> Searcher | None:
    """The workspace's search service, or None (after saying how to build an index)."""
    info = read_index_info(ws)
    if info is None:
        st.warning(f"This workspace has no search index yet. Build it with `curator index --workspace {ws.root}`, "
                   "then reload this page.")
        return None
    try:
        return _searcher(str(ws.root), generation(ws), f"{info.built_at}/{info.file}", device())
    except (WorkspaceError, OSError, RuntimeError) as exc:
        st.error(f"Cannot load the search index: {exc}. Rebuild it with `curator index --workspace {ws.root}`.")
        return None


@st.cache_data(show_spinner=False, max_entries=16)
def _distinct(root: str, gen: int, column: str) -> list:
    cur = cursor(Workspace(root))
    rows = cur.execute(f"SELECT DISTINCT {column} FROM catalog ORDER BY 1 NULLS LAST").fetchall()
    return [r[0] for r in rows]


def distinct_values(ws: Workspace, column: str) -> list:
    assert column in ("view_position", "modality", "patient_sex")
    return _distinct(str(ws.root), generation(ws), column)


# -- widgets ------------------------------------------------------------------------------------
def missing(v) -> bool:
    """None, NaN or NaT."""
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _fmt_value(v) -> str:
    return NOT_RECORDED if missing(v) else str(v)


def filter_widgets(ws: Workspace, key: str, with_condition: bool = True) -> SearchFilter:
    """Metadata (and probability) filters; returns the :class:`SearchFilter` they describe."""
    c1, c2, c3 = st.columns(3)
    views = c1.multiselect("View position", distinct_values(ws, "view_position"), format_func=_fmt_value, key=f"{key}-view")
    mods = c2.multiselect("Modality", distinct_values(ws, "modality"), format_func=_fmt_value, key=f"{key}-modality")
    sexes = c3.multiselect("Sex", distinct_values(ws, "patient_sex"), format_func=_fmt_value, key=f"{key}-sex")
    c1, c2, c3 = st.columns(3)
    age = c1.slider("Age (years)", 0, 120, (0, 120), key=f"{key}-age")
    date_from = c2.date_input("Study date from", value=None, min_value=dt.date(1900, 1, 1), key=f"{key}-from")
    date_to = c3.date_input("Study date to", value=None, min_value=dt.date(1900, 1, 1), key=f"{key}-to")
    if date_from and date_to and date_from > date_to:
        st.warning("“Study date from” is after “Study date to”: no image can pass.")
    condition = ""
    if with_condition:
        condition = st.text_input(
            "Probability condition", key=f"{key}-cond", placeholder="e.g. edema > 0.7 and not cardiomegaly > 0.5",
            help="Findings (columns of `images`) compared with numbers, combined with and / or / not and brackets. "
                 "A finding alone means probability > 0.5. Findings: " + ", ".join(finding_columns(ws)),
        )
    return SearchFilter(
        view_positions=list(views), modalities=list(mods), sexes=list(sexes),
        age_min=age[0] if age[0] > 0 else None, age_max=age[1] if age[1] < 120 else None,
        date_from=date_from, date_to=date_to, condition=condition or "",
    )


def thumbnails(ws: Workspace, ids, size: str = "small") -> tuple[dict[int, bytes], dict[int, str]]:
    return get_thumbnails(ws.root, cursor(ws), ids, size)


def study_year(v) -> int | None:
    """The year of a study date (the screens show no full dates, as a de-identified export)."""
    if missing(v):
        return None
    try:
        return int(pd.Timestamp(v).year)
    except (TypeError, ValueError):
        return None


def _fmt_date(v) -> str:
    year = study_year(v)
    return "year —" if year is None else str(year)


def image_grid(ws: Workspace, df: pd.DataFrame, findings: list[str], key: str, actions: bool = True,
               on_details=None, on_similar=None, after_row=None) -> None:
    """Thumbnails of ``df``'s images (rows with ``image_id``), with similarity and probabilities.
    ``after_row(ids)``, if given, is called below each row of the grid with that row's image ids
    (the search page opens an image's details there, where the user clicked)."""
    if df.empty:
        return
    ids = [int(i) for i in df["image_id"]]
    found, problems = thumbnails(ws, ids)
    rows = df.to_dict("records")
    for start in range(0, len(rows), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, r in zip(cols, rows[start:start + GRID_COLUMNS]):
            iid = int(r["image_id"])
            with col.container(border=True):
                if iid in found:
                    st.image(found[iid], width="stretch")
                else:
                    st.caption(f"no preview: {problems.get(iid, 'unavailable')}")
                lines = []
                if "similarity" in r and not missing(r["similarity"]):
                    lines.append(f"**#{r.get('rank', '')}** · similarity **{r['similarity']:.3f}**")
                else:
                    lines.append(f"image {iid}")
                probs = [f"{f} {r[f]:.2f}" for f in findings if f in r and not missing(r[f])]
                if probs:
                    lines.append(" · ".join(probs))
                view = r.get("view_position")
                lines.append(f"view {'—' if missing(view) else view} · {_fmt_date(r.get('study_date'))}")
                st.markdown("  \n".join(lines))
                if actions:
                    st.button("Details", key=f"{key}-det-{iid}", on_click=on_details, args=(iid,), width="stretch",
                              icon=":material/zoom_in:", type="tertiary")
                    st.button("More like this", key=f"{key}-mlt-{iid}", on_click=on_similar, args=(iid,), width="stretch",
                              icon=":material/image_search:", type="tertiary")
        if after_row is not None:
            after_row([int(r["image_id"]) for r in rows[start:start + GRID_COLUMNS]])


def visible_metadata(row: dict) -> dict:
    """Catalog fields fit to show (:data:`SHOWN_COLUMNS`, in that order), without empty values."""
    out = {}
    row = {**row, "study_year": study_year(row.get("study_date"))}
    for k in SHOWN_COLUMNS:
        v = row.get(k)
        if k in out or missing(v):
            continue
        if k == "patient_age" and float(v) > AGE_CAP - 1:  # as a de-identified export has it (HIPAA Safe Harbor)
            v = f"{AGE_CAP}+"
        out[k] = v.isoformat() if hasattr(v, "isoformat") else v
    return out


def unsafe_server_settings() -> list[str]:
    """How the running server breaks the app's promises (this machine only, no usage statistics).

    ``curator app`` sets both itself (``--host`` can open it to a network, with a warning); a plain
    ``streamlit run app/main.py`` listens on every network interface and reports usage statistics
    unless its configuration says otherwise.
    """
    if os.environ.get(ENV_LAUNCHED) == "1":
        return []
    out = []
    address = st.get_option("server.address")
    if not address or not is_loopback(str(address)):
        out.append(f"it listens on {address or 'every network interface'}, not on this machine only")
    if st.get_option("browser.gatherUsageStats"):
        out.append("it sends Streamlit usage statistics")
    return out


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, default=str).encode()


def exports_base() -> str | None:
    """The folder given for exports (``--exports DIR`` or $CURATOR_EXPORTS), if any."""
    return _argv_value("--exports") or os.environ.get(ENV_EXPORTS) or None


def export_folder(name: str) -> Path:
    """A new folder for one export: under ``--exports DIR`` (or $CURATOR_EXPORTS) when given, else a
    fresh temporary folder. Never inside the workspace (exports may leave it; the workspace stays as built)."""
    import re
    import tempfile

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "cohort"
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    base = exports_base()
    parent = Path(base).expanduser() if base else Path(tempfile.mkdtemp(prefix="curator-export-"))
    parent.mkdir(parents=True, exist_ok=True)
    out = parent / f"{safe}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = parent / f"{safe}-{stamp}-{n}"
    return out


def label_columns(ws: Workspace) -> list[str]:
    """``<finding>_label`` columns of the ``labels`` view (present once the workspace is calibrated)."""
    try:
        rows = cursor(ws).execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'labels' AND column_name LIKE '%\\_label' ESCAPE '\\' "
            "ORDER BY 1").fetchall()
    except Exception:  # noqa: BLE001 - no labels view: not calibrated
        return []
    return [r[0] for r in rows]
