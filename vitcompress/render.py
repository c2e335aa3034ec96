"""Renderers of a :class:`~vitcompress.report.Report`: ``report.md`` and the rows the CLI prints.

They read the typed report's attributes only; the report stage, ``remeasure`` and the CLI use them.
"""

from __future__ import annotations

from vitcompress.models import model_args_text
from vitcompress.profile import block_columns, block_rows, parts_line
from vitcompress.report import DataSplit, Report


def side_by_side_rows(report: Report) -> list[tuple[str, str, str]]:
    """(metric, original, converted) rows of the comparison table, formatted for people."""
    models = report.validation.models
    original, converted = models["original"], models["converted"]
    rows = [
        ("params", f"{original.params / 1e6:.2f} M", f"{converted.params / 1e6:.2f} M"),
        ("MACs / image", f"{original.macs / 1e6:.1f} M", f"{converted.macs / 1e6:.1f} M"),
    ]
    for batch in original.latency:
        o, c = original.latency[batch], converted.latency[batch]
        rows.append((f"ORT latency b{batch} p50 / p90", f"{o.p50_ms:.2f} / {o.p90_ms:.2f} ms",
                     f"{c.p50_ms:.2f} / {c.p90_ms:.2f} ms ({o.p50_ms / c.p50_ms:.2f}×)"))
    if original.top1 is not None:
        rows.append(("top-1 (%)", f"{original.top1:.2f}", f"{converted.top1:.2f}"))
    rows.append(("top-1 agreement with original", "100.00 %", f"{converted.agreement * 100:.2f} %"))
    against = "" if converted.parity.onnx == "float32" else f" (torch float32 vs ORT {converted.parity.onnx})"
    rows.append(("max |torch − ORT| on logits", f"{original.parity.max_abs_diff:.2e}",
                 f"{converted.parity.max_abs_diff:.2e}{against}"))
    return rows


def cka_rows(report: Report) -> list[tuple[str, str, str]]:
    """(block, CKA when first scored, round in which it was skipped) for each CKA-selected skip step."""
    rows = []
    for step in report.steps:
        rounds = [r for r in (step.details or {}).get("rounds", []) if r["chosen"] is not None]
        if rounds:
            chosen = {r["chosen"]: i + 1 for i, r in enumerate(rounds)}
            rows += [(block, f"{score:.4f}", str(chosen.get(block, "—"))) for block, score in rounds[0]["cka"].items()]
    return rows


def cascade_rows(report: Report) -> list[tuple[str, str, str, str]]:
    """(low-effort fraction, early exits, top-1, expected latency vs the original at the first batch size) per
    operating point."""
    rows = []
    for point in report.cascade.sweep:
        cost = next(iter(point.expected_ms.values()))
        top = "n/a" if point.top1 is None else f"{point.top1:.2f}"
        rows.append((f"{point.low_effort_fraction:g}", f"{point.early_fraction * 100:.1f} %", top,
                     f"{cost.cascade:.2f} ms vs {cost.original:.2f} ms ({cost.speedup:.2f}×)"))
    return rows


def split_text(split: DataSplit) -> str:
    """One line on how the train and validation images were kept apart."""
    if split.kind == "held-out":
        groups = [name for name in split.per_class or {} if name]
        of = f"each of {len(groups)} class folders" if groups else "the unlabelled images"
        return (f"{split.holdout_fraction * 100:g} % of {of} held out for validation ({split.held_out_images} "
                f"images, seed {split.seed}); the rest calibrates and fine-tunes")
    if split.kind == "directories":
        return "DIR/train calibrates and fine-tunes, DIR/val validates"
    return "the dataset's own train and validation splits"


def timings_line(report: Report) -> str | None:
    """Where the conversion's wall time went, in one line (None for a report without timings): each stage, with
    the parts that took at least a tenth of it, and the steps' calibration passes under transform."""
    if report.timings is None:
        return None
    stages = []
    for stage in report.timings.stages:
        parts = [f"{part.name} {part.seconds:.1f}" for part in stage.parts
                 if part.seconds >= 0.1 * stage.seconds and part.seconds >= 0.05]
        if stage.stage == "transform":
            calibration = sum(step.calibration_seconds or 0 for step in report.steps)
            if calibration:
                parts.append(f"calibration {calibration:.1f}")
        stages.append(f"{stage.stage} {stage.seconds:.1f}" + (f" ({', '.join(parts)})" if parts else ""))
    return f"{report.timings.seconds:.1f} s: " + ", ".join(stages)


def markdown(report: Report) -> str:
    lines = [f"# vitcompress report: {report.model.name}", "",
             f"- weights: {report.model.weights}",
             *([f"- architecture changed (random init): {model_args_text(report.model.model_args)}"]
               if report.model.model_args else []),
             f"- recipe: {report.recipe}",
             f"- data: {report.data.name} ({report.validation.images} validation images)",
             *([f"- split: {split_text(report.data.split)}"] if report.data.split else []),
             f"- onnxruntime CPU, {report.validation.threads} intra-op threads; machine: {report.machine}",
             f"- date: {report.date}",
             *([f"- latency re-measured {report.remeasured.date} ({report.remeasured.reason}); converted "
                f"{report.remeasured.converted_date} on {report.remeasured.converted_on}"]
               if report.remeasured else []), ""]
    if report.finetune:
        ft = report.finetune
        losses = f"loss {ft.first_loss:.4f} → {ft.last_loss:.4f}, " if ft.first_loss is not None else ""
        lines.append(f"- fine-tune: {ft.steps_done}/{ft.steps_budget} steps, {losses}"
                     f"{ft.images_per_second:.0f} img/s, {ft.precision}"
                     + (f", {ft.world_size} processes ({ft.backend}) × {ft.per_rank_batch} images"
                        if ft.world_size > 1 else "")
                     + (f", {ft.skipped_images} unreadable images skipped" if ft.skipped_images else "")
                     + (f", resumed at step {ft.resumed_from_step}" if ft.resumed_from_step is not None else "")
                     + (f" — {ft.stopped}" if ft.stopped else ""))
    for step in report.steps:
        lines.append(f"- step {step.step} `{step.transform}`: {len(step.modules)} modules, params "
                     f"{step.params_before:,} → {step.params_after:,}")
    if timings_line(report):
        lines.append(f"- wall time (seconds per stage): {timings_line(report)}")
    if report.export.moe_dispatch:
        d = report.export.moe_dispatch
        measured = "; ".join(f"{form} " + ", ".join(f"b{b} {ms:.2f} ms" for b, ms in times.items())
                             for form, times in d.latency.items())
        lines.append(f"- MoE export form: **{d.chosen}** for {d.layers} layers (onnxruntime p50 over "
                     f"{d.runs} interleaved runs: {measured})")
    if report.export.quantize:
        q = report.export.quantize
        ranges = (f", {q.activations} activations, {q.calibration} ranges from {q.calibration_images} calibration "
                  "images" if q.mode == "static" else ", activation ranges at run time")
        lines.append(f"- int8 ({q.mode}, onnxruntime.quantization): {q.nodes} MatMul/Gemm/Conv nodes, per-channel "
                     f"weights {q.per_channel}{ranges}; model.onnx {report.export.onnx_bytes / 1e6:.1f} MB "
                     f"(float32 {q.fp32_onnx_bytes / 1e6:.1f} MB). The converted column is the int8 model.")
    lines += ["", "| metric | original | converted |", "|---|---|---|"]
    lines += [f"| {m} | {o} | {c} |" for m, o, c in side_by_side_rows(report)]
    if cka_rows(report):
        lines += ["", "| block | linear CKA (input, attention output) | skipped in round |", "|---|---|---|"]
        lines += [f"| {b} | {c} | {r} |" for b, c, r in cka_rows(report)]
    if report.cascade:
        c = report.cascade
        lines += ["", f"Cascade (low → high effort, entropy threshold {c.threshold:.4g} calibrated on the "
                  f"{c.images} validation images): top-1 low {_pct(c.top1_low)}, high {_pct(c.top1_high)}; "
                  "expected latency per image = c_low + (1 − f)·c_high at the first batch size.", "",
                  "| low_effort_fraction | exit early | cascade top-1 | expected latency vs original |",
                  "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {t} | {e} |" for a, b, t, e in cascade_rows(report)]
    if report.profile:
        lines += ["", *profile_markdown(report.profile)]
    lines += ["", "| gate | limit | value | result |", "|---|---|---|---|"]
    for g in report.validation.gates:
        value = "—" if g.value is None else f"{g.value:.4g}"
        result = {True: "pass", False: "**FAIL**", None: g.note or "skipped"}[g.passed]
        about = f" ({g.note})" if g.note and g.passed is not None else ""
        lines.append(f"| {g.gate}{about} | {g.limit} | {value} | {result} |")
    return "\n".join(lines) + "\n"


def profile_markdown(profile: dict) -> list[str]:
    """The per-block latency table (original vs converted) of the report's ``profile`` section."""
    original, converted = profile["original"], profile["converted"]
    lines = [f"Per-block latency: onnxruntime profiler, batch {converted['batch_size']}, each node's median "
             f"over {converted['runs']} runs, {converted['threads']} threads; ms per run of the node kernels "
             f"({original['node_ms']:.2f} / {converted['node_ms']:.2f} ms of a {original['run_ms']:.2f} / "
             f"{converted['run_ms']:.2f} ms profiled run, original / converted). attn / mlp / norm / other: "
             "the converted block's time by sub-module; top op types: share of the converted row.", "",
             f"Original → converted, {parts_line(converted, original)}.", ""]
    columns = block_columns("original")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in block_rows(converted, original)]
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"
