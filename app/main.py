"""`streamlit run app/main.py`: the comparison app. The entrypoint is the router and the shared
frame (the sidebar's store settings); the pages live in app/app_pages/ (not `pages/`, which
Streamlit treats as its legacy automatic navigation).

It reads the same stores the trainer and the search write: MLflow at `MLFLOW_TRACKING_URI`
(default ./mlflow.db) and Optuna at sqlite:///optuna.db in the working directory, both
changeable in the sidebar: run it from the folder the search ran in (the repository root in the
README) so the default stores are found. app/.streamlit/config.toml binds it to localhost.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the root
    sys.path.insert(0, str(ROOT))

import streamlit as st

from app import store, studies

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="LM playground", page_icon=":material/science:", layout="wide")


def settings() -> None:
    """The stores every page reads; kept in session state across pages."""
    with st.sidebar:
        st.caption("Stores")
        st.text_input("MLflow tracking URI", value=store.tracking_uri(), key="tracking_uri",
                      help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
        st.text_input("Optuna storage", value=studies.default_storage(), key="optuna_storage",
                      help="Default: sqlite:///optuna.db in the working directory, as `python -m search.run` uses")
        if st.button("Reload data", help="Clear the cached queries (they refresh every minute anyway)"):
            st.cache_data.clear()


settings()
page = st.navigation([
    st.Page(PAGES / "studies.py", title="Studies", icon=":material/science:", default=True),
    st.Page(PAGES / "compare.py", title="Compare runs", icon=":material/show_chart:"),
    st.Page(PAGES / "graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page(PAGES / "run.py", title="Run", icon=":material/inventory_2:"),
])
page.run()
