"""Stage 6 — report: ``report.json`` (everything measured) and ``report.md`` (the side-by-side table)."""

from __future__ import annotations

import json

from vitcompress.context import RunContext


def side_by_side_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, original, converted) rows of the comparison table, formatted for people."""
    models = report["validation"]["models"]
    original, converted = models["original"], models["converted"]
    rows = [
        ("params", f"{original['params'] / 1e6:.2f} M", f"{converted['params'] / 1e6:.2f} M"),
        ("MACs / image", f"{original['macs'] / 1e6:.1f} M", f"{converted['macs'] / 1e6:.1f} M"),
    ]
    for batch in original["latency"]:
        o, c = original["latency"][batch], converted["latency"][batch]
        speedup = o["p50_ms"] / c["p50_ms"]
        rows.append((f"ORT latency {batch} p50 / p90", f"{o['p50_ms']:.2f} / {o['p90_ms']:.2f} ms",
                     f"{c['p50_ms']:.2f} / {c['p90_ms']:.2f} ms ({speedup:.2f}×)"))
    if original["top1"] is not None:
        rows.append(("top-1 (%)", f"{original['top1']:.2f}", f"{converted['top1']:.2f}"))
    rows.append(("top-1 agreement with original", "100.00 %", f"{converted['agreement'] * 100:.2f} %"))
    rows.append(("max |torch − ORT| on logits", f"{original['parity']['max_abs_diff']:.2e}",
                 f"{converted['parity']['max_abs_diff']:.2e}"))
    return rows


def failed_gates(report: dict) -> list[dict]:
    return [g for g in report["validation"]["gates"] if g["passed"] is False]


def markdown(report: dict) -> str:
    lines = [f"# vitcompress report: {report['model']['name']}", "",
             f"- weights: {report['model']['weights']}",
             f"- recipe: {report['recipe']}",
             f"- data: {report['data']['name']} ({report['validation']['images']} validation images)",
             f"- onnxruntime CPU, {report['validation']['threads']} intra-op threads; machine: {report['machine']}",
             f"- date: {report['date']}", ""]
    if report.get("finetune"):
        ft = report["finetune"]
        lines.append(f"- fine-tune: {ft['steps_done']}/{ft['steps_budget']} steps, loss {ft['first_loss']:.4f} → "
                     f"{ft['last_loss']:.4f}, {ft['images_per_second']:.0f} img/s"
                     + (f" — {ft['stopped']}" if ft["stopped"] else ""))
    for step in report["steps"]:
        lines.append(f"- step {step['step']} `{step['transform']}`: {len(step['modules'])} modules, params "
                     f"{step['params_before']:,} → {step['params_after']:,}")
    lines += ["", "| metric | original | converted |", "|---|---|---|"]
    lines += [f"| {m} | {o} | {c} |" for m, o, c in side_by_side_rows(report)]
    lines += ["", "| gate | limit | value | result |", "|---|---|---|---|"]
    for g in report["validation"]["gates"]:
        value = "—" if g["value"] is None else f"{g['value']:.4g}"
        result = {True: "pass", False: "**FAIL**", None: g.get("note", "skipped")}[g["passed"]]
        lines.append(f"| {g['gate']} | {g['limit']} | {value} | {result} |")
    return "\n".join(lines) + "\n"


def run(ctx: RunContext) -> None:
    ctx.report["failed_gates"] = [g["gate"] for g in failed_gates(ctx.report)]
    (ctx.work_dir / "report.json").write_text(json.dumps(ctx.report, indent=2))
    (ctx.work_dir / "report.md").write_text(markdown(ctx.report))
