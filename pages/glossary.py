"""Glossary page: each metric the app shows, explained once, and the sign convention for drop and change."""

import streamlit as st

from ui import glossary, state

state.active()
st.title("Glossary")
st.write("What the numbers on every page and lesson mean. Pages link here next to each metric.")
for anchor, (term, text) in glossary.TERMS.items():
    st.subheader(term, anchor=anchor)
    st.markdown(text)
