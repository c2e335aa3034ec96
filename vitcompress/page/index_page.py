"""``index.html`` of a batch: every job with its status and numbers, a speed-up vs accuracy-drop scatter, and a link
to each job's ``report.html`` (rebuilt from the bundle when a cached bundle from an older version has none)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vitcompress.batch.results import BatchResult
from vitcompress.deploy.bundle import PAGE
from vitcompress.errors import VitCompressError
from vitcompress.page.assets import environment
from vitcompress.page.charts import scatter_figure
from vitcompress.page.report_page import write_report_page

INDEX = "index.html"


@dataclass
class JobRow:
    name: str
    model: str
    recipe: str
    status: str
    passed: bool
    speedup: float | None
    drop: float | None
    agreement: float | None
    page: str | None
    failed: str


def job_page(out: Path, bundle: str | None) -> str | None:
    """The job's report.html relative to ``out`` (written first when the bundle has a report but no page)."""
    if bundle is None or not (out / bundle / "report.json").is_file():
        return None
    if not (out / bundle / PAGE).is_file():
        try:
            write_report_page(out / bundle)
        except (VitCompressError, OSError):
            return None
    return Path(bundle, PAGE).as_posix()


def rows(batch: BatchResult, out: Path) -> list[JobRow]:
    result = []
    for job in batch.jobs:
        metrics = job.metrics or {}
        drop = metrics.get("top1_drop")
        result.append(JobRow(
            name=job.name, model=job.model, recipe=job.recipe, status=job.status,
            passed=job.status in ("passed", "cached"), speedup=metrics.get("speedup_b1"), drop=drop,
            agreement=metrics.get("agreement"), page=job_page(out, job.bundle),
            failed="; ".join(g.message for g in job.failed_gates) or job.error or ""))
    return result


def write_index(batch: BatchResult, out: Path) -> Path:
    """Write ``out/index.html`` for ``batch`` (whose bundle paths are relative to ``out``) and return its path.

    The scatter's accuracy drop is the top-1 drop in points where the jobs have labels, else the share of images
    whose top-1 changed (100 × (1 − agreement)): one axis, one meaning, said on the axis."""
    table = rows(batch, out)
    labelled = any(row.drop is not None for row in table)
    points = [(row.name, row.drop if labelled else 100 * (1 - row.agreement), row.speedup) for row in table
              if row.speedup is not None and (row.drop is not None if labelled else row.agreement is not None)]
    what = "top-1 drop (points)" if labelled else "images whose top-1 changed (%)"
    text = environment().get_template("index.html.j2").render(
        batch=batch, rows=table, figures={"scatter": scatter_figure(points, what)} if points else {},
        points=len(points))
    path = out / INDEX
    temporary = path.with_name(f".{INDEX}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path
