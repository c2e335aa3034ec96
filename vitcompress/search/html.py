"""``pareto.html``: every trial of a tune study as a point (speed-up against points lost), the front highlighted,
hovering a point shows its recipe; one self-contained file that works offline (plotly's JavaScript inlined)."""

from __future__ import annotations

import html

from vitcompress.search.result import TrialPoint, TuneResult


def _hover(point: TrialPoint) -> str:
    m = point.measured
    lines = [f"trial {point.trial}" + (f" → {point.file}" if point.file else ""), html.escape(point.summary),
             f"{m.speedup:.2f}× ({m.original_ms:.2f} → {m.latency_ms:.2f} ms)",
             f"drop {m.drop:.2f} pt, agreement {100 * m.agreement:.2f} %"]
    if point.trial_measured is not None:
        lines.append(f"confirmed by a replay ({point.trial_measured.speedup:.2f}× in the trial)")
    if m.finetune_steps:
        lines.append(f"fine-tuned {m.finetune_steps} steps")
    return "<br>".join(lines)


def pareto_html(result: TuneResult) -> str:
    """The page's HTML text."""
    import plotly.graph_objects as go

    settings = result.settings
    on_front = {p.trial for p in result.front}
    others = [p for p in result.points if p.trial not in on_front]
    figure = go.Figure()
    for name, group, style in (
        ("trials", others, dict(color="rgba(120,120,120,0.55)", size=8)),
        ("Pareto front", result.front, dict(color="#d62728", size=11, line=dict(color="black", width=1))),
    ):
        figure.add_trace(go.Scatter(
            x=[p.measured.drop for p in group], y=[p.measured.speedup for p in group], name=name,
            mode="markers+lines" if group is result.front else "markers", marker=style,
            line=dict(color="#d62728", dash="dot") if group is result.front else None,
            text=[_hover(p) for p in group], hovertemplate="%{text}<extra></extra>"))
    if settings.objective == "accuracy":
        figure.add_vline(x=settings.max_drop, line_dash="dash", line_color="#1f77b4",
                         annotation_text=f"max drop {settings.max_drop:g} pt")
    if settings.target_speedup is not None:
        figure.add_hline(y=settings.target_speedup, line_dash="dash", line_color="#2ca02c",
                         annotation_text=f"target {settings.target_speedup:g}×")
    drop_axis = "top-1 drop (points)" if result.points and result.points[0].measured.top1 is not None \
        else "disagreement with the original (points)"
    figure.update_layout(
        title=f"vitcompress tune: {html.escape(settings.model)}, {result.measured} measured trials "
              f"(batch {settings.batch_size}, {html.escape(result.machine)}, {result.date[:10]})",
        xaxis_title=drop_axis, yaxis_title="speed-up over the original (onnxruntime, interleaved)",
        template="plotly_white", hovermode="closest")
    return figure.to_html(include_plotlyjs=True, full_html=True)
