"""App: the Streamlit comparison app (`streamlit run app/main.py`). May import `search`, `graphs`."""
