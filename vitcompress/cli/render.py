"""The rich tables and lines the commands print: reports, plans, profiles, recipes, predictions, checks.

Each helper turns a library result (a :class:`~vitcompress.report.Report`, a plan or profile dict, a verify
result, prediction rows) into console output; the rows themselves come from the library's renderers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from vitcompress.planner import Plan
    from vitcompress.report import Report


def report_table(report: Report) -> Table:
    """Original vs converted, one row per metric."""
    from vitcompress.render import side_by_side_rows

    table = Table(title=f"{report.model.name}: original vs converted (onnxruntime CPU, "
                        f"{report.validation.threads} threads)")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    for row in side_by_side_rows(report):
        table.add_row(*row)
    return table


def extra_tables(report: Report) -> list[Table]:
    """CKA scores of attention_skip steps and the cascade's operating points, when the run has them."""
    from vitcompress.render import cascade_rows, cka_rows

    tables = []
    if cka_rows(report):
        table = Table(title="attention_skip: linear CKA(block input, attention output), first round")
        for column in ("block", "CKA", "skipped in round"):
            table.add_column(column, justify="right")
        for row in cka_rows(report):
            table.add_row(*row)
        tables.append(table)
    if report.cascade:
        c = report.cascade
        table = Table(title=f"cascade: low → high effort by entropy (threshold {c.threshold:.4g} at "
                            f"fraction {c.low_effort_fraction:g})")
        for column in ("low_effort_fraction", "exit early", "top-1 (%)", "expected latency / image"):
            table.add_column(column, justify="right")
        for row in cascade_rows(report):
            table.add_row(*row)
        tables.append(table)
    return tables


def print_plan(result: Plan) -> None:
    """The plan's table (one row per step), the modules each step matched, the export check and the times."""
    from vitcompress.planner import compact_names, export_line, plan_rows

    out = Console()
    table = Table(title=f"plan: {result.model.name} with {result.recipe}", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    table.add_column("step", no_wrap=True)
    for column in ("params (M)", "MACs (M)", "speed-up", "total", "s"):
        table.add_column(column, justify="right")
    for row in plan_rows(result):
        table.add_row(*row)
    out.print(table)
    for step in result.steps:
        out.print(f"step {step.step} {step.transform} matched {step.matched}: "
                  f"{escape(', '.join(compact_names(step.modules)))}", highlight=False)
    original, final = result.original, result.final
    out.print(f"weights: {escape(result.model.weights)}", highlight=False)
    out.print(f"predicted speed-up: {final.speedup:.2f}× (int8 MACs at their measured onnxruntime cost; MACs alone "
              f"{final.mac_speedup:.2f}×); params {original.params / 1e6:.2f} → {final.params / 1e6:.2f} M",
              highlight=False)
    if result.calibration:
        cal = result.calibration
        out.print(f"calibrated on {cal.images} of the recipe's {cal.recipe_images} images "
                  f"({escape(cal.data)}; --calibration-images N)", highlight=False)
    if result.planned != "steps":
        out.print(f"planned: {result.planned}", highlight=False)
    out.print(escape(export_line(result.export)), highlight=False)
    seconds = result.seconds
    parts = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total" and v is not None)
    out.print(f"plan took {seconds['total']:.1f} s ({parts})", highlight=False)


def profile_table(bundle: Path, result: dict, batch_size: int, runs: int) -> Table:
    """ms per run by block of the converted model, beside the baseline's when it was profiled too."""
    from vitcompress.profile import block_columns, block_rows, parts_line

    converted, reference = result["converted"], result["baseline"]
    table = Table(title=f"{escape(str(bundle))}: ms per run by block (onnxruntime profiler, batch {batch_size}, "
                        f"median of {runs} runs, {converted['threads']} threads)",
                  caption=f"{parts_line(converted, reference)}\nnode kernels {converted['node_ms']:.2f} ms of a "
                          f"{converted['run_ms']:.2f} ms profiled run; {converted['unmapped_nodes']} of "
                          f"{converted['nodes']} nodes unmapped")
    for column in block_columns("baseline" if reference else None):
        text = column in ("block", "recipe steps", "top op types")
        table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for row in block_rows(converted, reference):
        table.add_row(*row, end_section=row[0] == "unmapped")
    return table


def recipe_tables() -> list[Table]:
    """The shipped recipes, then one table per transform with its parameters, types, defaults and meanings."""
    from vitcompress.recipe import recipe_description, shipped_recipes
    from vitcompress.transforms import registry

    shipped = Table(title="[bold]shipped recipes[/] (--recipe NAME; a file of that name here comes first)",
                    title_justify="left", show_edge=False)
    shipped.add_column("name", no_wrap=True)
    shipped.add_column("description")
    for name, path in shipped_recipes().items():
        shipped.add_row(name, escape(recipe_description(path)))
    tables = [shipped]
    for name, transform in registry.available().items():
        table = Table(title=f"[bold]{name}[/]: {transform.doc}", title_justify="left", show_edge=False)
        table.add_column("parameter")
        table.add_column("type / default")
        table.add_column("meaning")
        for field_name, field in transform.config.model_fields.items():
            if field_name == "transform":
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            annotation = field.annotation
            annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
            table.add_row(field_name, f"{annotation} = {default}", field.description or "")
        tables.append(table)
    return tables


def predictions_table(bundle: Path, rows: list[dict[str, Any]], top_k: int, threshold: float | None) -> Table:
    """One row per image: its top-1 label and probability, the rest of its top-k, and for a cascade (``threshold``
    given) the model that answered with the entropy that chose it."""
    cascade = threshold is not None
    title = f"{escape(str(bundle))}: top-{top_k}" + (
        f" (cascade: exit at the low model when entropy ≤ {threshold:.4g})" if cascade else "")
    table = Table(title=title)
    for column in ("image", "top-1", "p", f"top-{top_k}" if top_k > 1 else None, "model" if cascade else None):
        if column:
            table.add_column(column, justify="right" if column == "p" else "left")
    for r in rows:
        cells = [escape(r["path"]), escape(r["labels"][0]), f"{r['probabilities'][0]:.3f}"]
        if top_k > 1:
            cells.append(escape(", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"][1:], r["probabilities"][1:]))))
        if cascade:
            cells.append(f"{r['model']} ({r['entropy']:.3f})")
        table.add_row(*cells)
    return table


def jobs_table(rows: dict[str, list[str]]) -> Table:
    """The batch's live table: one row per job with its status, seconds and detail."""
    table = Table(box=box.SIMPLE_HEAD, title="vitcompress batch")
    for column in ("job", "status", "s", "detail"):
        table.add_column(column, overflow="fold")
    for name, (status, seconds, detail) in rows.items():
        table.add_row(name, status, seconds, escape(detail))
    return table
