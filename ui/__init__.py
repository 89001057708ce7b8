"""Helpers the app's pages share that are not pages and not engine code (``qcore`` never imports Streamlit)."""
