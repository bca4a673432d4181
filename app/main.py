"""curator's Streamlit app: search, cohorts, overview and SQL over one workspace.

Start it with ``curator app --workspace W`` (localhost only unless ``--host`` says otherwise), or
``CURATOR_WORKSPACE=W streamlit run app/main.py --server.address 127.0.0.1 --browser.gatherUsageStats
false`` (without those two settings it refuses to show anything).
"""

import os

# Idle OpenMP threads sleep rather than spin (torch and faiss each have a pool; see curator.appserver).
# Effective when this runs before torch / faiss are loaded, i.e. on the first run of a fresh server.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st
from curator.app import common

from curator import __version__

st.set_page_config(page_title="curator", page_icon=":material/radiology:", layout="wide")

unsafe = common.unsafe_server_settings()
if unsafe:
    st.error("This app shows a hospital archive's images, so it does not run while " + " and ".join(unsafe) + ". "
             "Start it with `curator app --workspace W` (this machine only; `--host` to serve a network), or add "
             "`--server.address 127.0.0.1 --browser.gatherUsageStats false` to the `streamlit run` line.")
    st.stop()

page = st.navigation([
    st.Page("pages/search.py", title="Search", icon=":material/search:", default=True),
    st.Page("pages/cohort.py", title="Cohort builder", icon=":material/group:"),
    st.Page("pages/overview.py", title="Overview", icon=":material/monitoring:"),
    st.Page("pages/sql.py", title="SQL", icon=":material/database:"),
])

with st.sidebar:
    root = common.workspace_root()
    st.caption(f"workspace: `{root}`" if root else "no workspace")
    st.caption(f"curator {__version__}")

page.run()
