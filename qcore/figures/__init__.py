"""Plotly figures: plain data in, a figure out."""
