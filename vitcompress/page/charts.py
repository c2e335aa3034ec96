"""The pages' plotly figures as JSON-ready dicts (``{"data": [...], "layout": {...}}``), drawn by plotly.js.

Plotly reads ``<b>``-style markup in labels, so every user-given label passes through :func:`label` (HTML-escaped)
and is shown as text. Numbers come from the typed report as they are; nothing here measures.
"""

from __future__ import annotations

import html

from vitcompress.report import Report

ORIGINAL, CONVERTED = "#7f7f7f", "#1f77b4"
_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 40, "b": 60}, "height": 340, "barmode": "group",
           "legend": {"orientation": "h", "y": 1.12}, "font": {"size": 12}}


def label(text: str) -> str:
    """``text`` escaped for a plotly label (plotly renders a subset of HTML tags in labels)."""
    return html.escape(text, quote=False)


def _layout(title: str, x: str, y: str, **more: object) -> dict:
    return {**_LAYOUT, "title": {"text": title}, "xaxis": {"title": {"text": x}}, "yaxis": {"title": {"text": y}},
            **more}


def latency_figure(report: Report) -> dict:
    """p50 ms per batch size of both models, the bars' whiskers from p10 to p90 (p10 = p90 − spread × p50)."""
    models = report.validation.models
    batches = list(models["original"].latency)
    traces = []
    for name, colour in (("original", ORIGINAL), ("converted", CONVERTED)):
        timings = [models[name].latency[b] for b in batches]
        traces.append({
            "type": "bar", "name": name, "marker": {"color": colour}, "x": [f"batch {b}" for b in batches],
            "y": [t.p50_ms for t in timings],
            "error_y": {"type": "data", "symmetric": False, "array": [t.p90_ms - t.p50_ms for t in timings],
                        "arrayminus": [max(t.p50_ms - (t.p90_ms - t.spread * t.p50_ms), 0.0) for t in timings]},
            "hovertemplate": "%{x}: p50 %{y:.3f} ms<extra>" + name + "</extra>"})
    return {"data": traces, "layout": _layout("latency per call (onnxruntime, p50; whiskers p10–p90)", "",
                                              "ms per call")}


def block_label(block: dict) -> str:
    """``block 3`` over the recipe steps that converted something in it (``0:svd``), one line each."""
    steps = [label(f"{s['step']}:{s['transform']}") for s in block["steps"]]
    return "<br>".join([f"block {block['block']}", *steps])


def blocks_figure(profile: dict) -> dict:
    """ms per run of each transformer block, original beside converted, blocks labelled with their steps."""
    converted = {b["block"]: b for b in profile["converted"]["blocks"]}
    original = {b["block"]: b for b in profile["original"]["blocks"]}
    blocks = sorted(set(converted) | set(original))
    names = [block_label(converted.get(i) or original[i]) for i in blocks]
    traces = [{"type": "bar", "name": name, "marker": {"color": colour}, "x": names,
               "y": [source[i]["ms"] if i in source else None for i in blocks],
               "hovertemplate": "%{x}: %{y:.3f} ms<extra>" + name + "</extra>"}
              for name, colour, source in (("original", ORIGINAL, original), ("converted", CONVERTED, converted))]
    batch = profile["converted"]["batch_size"]
    layout = _layout(f"per-block latency (onnxruntime profiler, batch {batch}, median of "
                     f"{profile['converted']['runs']} runs)", "", "ms per run", height=400)
    layout["xaxis"].update(automargin=True, tickangle=0)
    return {"data": traces, "layout": layout}


def end_to_end_figure(preprocess_ms: float, model_ms: float) -> dict:
    """One stacked bar: the share of decode + resize + normalise and of the model in the time per image."""
    traces = [{"type": "bar", "orientation": "h", "name": name, "y": ["per image"], "x": [ms],
               "marker": {"color": colour}, "hovertemplate": "%{x:.3f} ms<extra>" + name + "</extra>"}
              for name, ms, colour in (("decode, resize, normalise", preprocess_ms, ORIGINAL),
                                       ("model.onnx", model_ms, CONVERTED))]
    return {"data": traces, "layout": {**_layout("end-to-end latency per image (batch 1)", "ms", ""),
                                       "barmode": "stack", "height": 230, "legend": {"orientation": "h", "y": -0.45}}}


def heatmap_figure(sensitivity) -> dict:
    """Block group × recipe step: the accuracy cost of each step alone on each group (top-1 points lost with
    labels, else % of images whose top-1 changed), the speed-up in the hover; inapplicable cells are empty."""
    columns = [label(f"blocks {g[0]}–{g[-1]}" if len(g) > 1 else f"block {g[0]}") for g in sensitivity.groups]
    rows, cost, hover = [], [], []
    for step in sensitivity.steps:
        rows.append(label(f"step {step.step}: {step.transform}"))
        cells = {cell.group: cell for cell in step.cells}
        cost.append([None if not getattr(cells.get(g), "applicable", False) else
                     (cells[g].top1_drop if cells[g].top1_drop is not None else 100 * (1 - cells[g].agreement))
                     for g in range(len(columns))])
        hover.append([label(getattr(cells.get(g), "reason", "")) if not getattr(cells.get(g), "applicable", False)
                      else f"agreement {cells[g].agreement * 100:.1f} %, speed-up {cells[g].speedup:.2f}×"
                      for g in range(len(columns))])
    what = "top-1 points lost" if sensitivity.labelled else "% of images changed"
    return {"data": [{"type": "heatmap", "x": columns, "y": rows, "z": cost, "text": hover, "colorscale": "Reds",
                      "colorbar": {"title": {"text": what}},
                      "hovertemplate": "%{y}, %{x}: %{z:.2f}<br>%{text}<extra></extra>"}],
            "layout": {**_layout(f"sensitivity: each step alone per block group ({what}, no fine-tune)", "", ""),
                       "height": 220 + 50 * len(rows), "yaxis": {"automargin": True}}}


def scatter_figure(points: list[tuple[str, float, float]], what: str) -> dict:
    """Speed-up (y) against accuracy drop (x), one point per job (name, drop, speed-up)."""
    return {"data": [{"type": "scatter", "mode": "markers+text", "x": [p[1] for p in points],
                      "y": [p[2] for p in points], "text": [label(p[0]) for p in points], "textposition": "top center",
                      "marker": {"size": 11, "color": CONVERTED},
                      "hovertemplate": "%{text}: drop %{x:.2f}, speed-up %{y:.2f}×<extra></extra>"}],
            "layout": {**_layout("speed-up vs accuracy drop, per job", what, "speed-up at batch 1 (×)"),
                       "showlegend": False}}
