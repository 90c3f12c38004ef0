"""Pages of the minitorch visualizer (``streamlit run project/app.py``); each module has a ``render()``."""
