"""``index.html`` of a batch: every job with its status and numbers, a speed-up vs accuracy-drop scatter, and a link
to each job's ``report.html`` (rebuilt from the bundle when a cached bundle from an older version has none).

``vitcompress.batch.outputs`` turns its result into :class:`JobRow` s (only the CLI imports batch/)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vitcompress.deploy.bundle import PAGE
from vitcompress.errors import VitCompressError
from vitcompress.page.assets import environment
from vitcompress.page.charts import scatter_figure
from vitcompress.page.report_page import write_report_page

INDEX = "index.html"


@dataclass
class JobRow:
    """One job of the table and, when it has a speed-up, one point of the scatter."""

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


def write_index(table: list[JobRow], heading: str, out: Path) -> Path:
    """Write ``out/index.html`` with one row per job of ``table`` under ``heading`` and return its path.

    The scatter's accuracy drop is the top-1 drop in points where the jobs have labels, else the share of images
    whose top-1 changed (100 × (1 − agreement)): one axis, one meaning, said on the axis."""
    labelled = any(row.drop is not None for row in table)
    points = [(row.name, row.drop if labelled else 100 * (1 - row.agreement), row.speedup) for row in table
              if row.speedup is not None and (row.drop is not None if labelled else row.agreement is not None)]
    what = "top-1 drop (points)" if labelled else "images whose top-1 changed (%)"
    text = environment().get_template("index.html.j2").render(
        heading=heading, rows=table, figures={"scatter": scatter_figure(points, what)} if points else {},
        points=len(points))
    path = out / INDEX
    temporary = path.with_name(f".{INDEX}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path
