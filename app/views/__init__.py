"""The app's pages, registered with ``st.navigation`` by ``main.py``."""
