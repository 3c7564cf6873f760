"""Report: every plotly figure and HTML page. Low in the stack on purpose — it takes plain data (lists,
dicts, tensors) so any layer can draw, and it escapes all text it puts into a page."""
