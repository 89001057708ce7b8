"""Quantization Explorer: the Streamlit entry point. Run ``streamlit run app.py``.

``ui.frame`` declares the page navigation and the sidebar that picks the model, then runs the page; each page
in ``pages/`` reads widgets, calls ``qcore`` and shows the result.
"""

from ui import frame

frame.run()
