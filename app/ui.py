"""What every page shares: the chosen stores, cached queries (`st.cache_data` with a ttl, so a
page with hundreds of runs reads the store once a minute at most), the empty state that names
the command to run, and the error panel shown instead of a traceback."""
from __future__ import annotations

import streamlit as st

from app import store, studies
from app.runfiles import OutsideStore
from app.store import EmptyStore, StoreError

TTL_S = 60            # finished runs do not change; a running one shows new points within a minute
SEARCH_HINT = ("Run the default architecture search in this folder: `python -m search.run` (about "
               "5 minutes on a 2-core CPU), or train one graph: "
               "`python -m search.train graphs/gpt2.yaml --size tiny --budget 60s`.")


def tracking_uri() -> str:
    return st.session_state.get("tracking_uri") or store.tracking_uri()


def optuna_storage() -> str:
    return st.session_state.get("optuna_storage") or studies.default_storage()


def empty(what: str, detail: str) -> None:
    """The empty state: what is missing, where, and the command that fills it."""
    st.info(f"**{what}** {detail}\n\n{SEARCH_HINT}\n\nOr point the app elsewhere: set "
            "`MLFLOW_TRACKING_URI`, or change the stores in the sidebar.")


def error(exc: Exception) -> None:
    st.error(f"**Cannot read the store.** {exc}\n\nCheck that it is running and reachable, set "
             "`MLFLOW_TRACKING_URI` (or the Optuna storage in the sidebar), then rerun.")


def refused(exc: Exception) -> None:
    st.error(f"**Refused.** {exc}\n\nThe app reads files only inside the tracking store's folder; "
             "this run names a path elsewhere (`..`, an absolute path or a link), so it was not read.")


def guard(fn, *args, what: str = "Nothing here yet."):
    """fn(*args), or None after showing the empty state (EmptyStore), the refusal of a path
    outside the store (OutsideStore) or the error panel."""
    try:
        return fn(*args)
    except EmptyStore as e:
        empty(what, str(e) + ".")
    except OutsideStore as e:
        refused(e)
    except StoreError as e:
        error(e)
    return None


# ---- cached queries (errors are raised, never cached)

@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs_table(uri: str):
    return store.runs_table(uri)


@st.cache_data(ttl=TTL_S, show_spinner=False, max_entries=2000)
def history(uri: str, run_id: str, key: str):
    return store.history(uri, run_id, key)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def best_values(uri: str, run_ids: tuple, key: str):
    return store.best_values(uri, run_ids, key)


@st.cache_data(ttl=TTL_S, show_spinner=False, max_entries=200)
def run_detail(uri: str, run_id: str):
    return store.run_detail(uri, run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False, max_entries=200)
def artifacts(uri: str, run_id: str):
    return store.artifacts(uri, run_id)


@st.cache_data(ttl=600, show_spinner=False, max_entries=200)
def artifact_text(uri: str, run_id: str, path: str):
    return store.artifact_text(uri, run_id, path)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def study_names(url: str):
    return studies.study_names(url)


def run_label(row) -> str:
    """A short unique label of a run in pickers and legends."""
    return f"{row['name'] or row['run_id'][:8]} · {row['run_id'][:6]}"


def training_runs(df):
    """Runs that trained a graph (not a study's or comparison's parent run)."""
    return df[df["hash"].astype(bool)] if "hash" in df else df.iloc[0:0]


def page_path(name: str) -> str:
    """A page for st.switch_page, relative to app/main.py."""
    return f"app_pages/{name}.py"


def open_page(name: str, **state) -> None:
    """Switch page with some session state set (the run to show, the graphs to diff, ...)."""
    st.session_state.update(state)
    st.switch_page(page_path(name))


def best_first(df):
    """Training runs, lowest final val/bpb first (runs without one last, newest first among them):
    the order of the run pickers, so a page opens on the current winner."""
    return training_runs(df).sort_values("val_bpb", na_position="last", kind="stable")
