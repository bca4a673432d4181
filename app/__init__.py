"""The Streamlit app (installed as ``curator.app``); start it with ``curator app --workspace W``."""
