"""Quantization Explorer: Streamlit entry point (navigation and shared sidebar)."""

import streamlit as st

st.set_page_config(page_title="Quantization Explorer", layout="wide")
st.title("Quantization Explorer")
st.write("The app's pages are being built; see the README for the CLI.")
