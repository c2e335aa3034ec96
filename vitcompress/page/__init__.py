"""The HTML pages: ``report.html`` of one bundle and ``index.html`` of a batch (no torch, no network).

Jinja2 renders them with autoescaping (model, class, file and job names are user input); plotly.js draws the
charts from JSON figures, its library inlined once per page, gzipped and base64-encoded (:mod:`.assets`).
"""
