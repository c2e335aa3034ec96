"""Stage 9 — page: ``report.html`` from the finished bundle's own files (:mod:`vitcompress.page`).

Last, after the checksums: the page is a view of the files SHA256SUMS lists (and not listed itself), the same
one ``vitcompress report BUNDLE`` rebuilds without a model, with the checksums' status.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.page.report_page import write_report_page


def run(ctx: RunContext) -> None:
    ctx.progress.stage("page", "report.html: the ladder, latency, disagreements (no model runs)")
    write_report_page(ctx.work_dir)
