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

# (an emoji: Streamlit draws it as an inline SVG; a :material/...: page icon is fetched from Google's servers)
st.set_page_config(page_title="curator", page_icon="🩻", layout="wide")

if common.refuse_if_unsafe():
    st.stop()

# (The page scripts live in views/, not pages/: Streamlit serves a main script's pages/ folder
# page by page on its own when the script stops before st.navigation, as it does just above.)
page = st.navigation([
    st.Page("views/search.py", title="Search", icon=":material/search:", default=True),
    st.Page("views/cohort.py", title="Cohort builder", icon=":material/group:"),
    st.Page("views/overview.py", title="Overview", icon=":material/monitoring:"),
    st.Page("views/sql.py", title="SQL", icon=":material/database:"),
])

with st.sidebar:
    root = common.workspace_root()
    st.caption(f"workspace: `{root}`" if root else "no workspace")
    st.caption(f"curator {__version__}")

common.keep_widget_state()
page.run()
