"""Stage 6 — report: ``report.json`` (everything measured) and ``report.md`` (the side-by-side table).

The earlier stages assign their typed sections to ``ctx.report`` (:class:`~vitcompress.report.Sections`); this stage
builds the :class:`~vitcompress.report.Report` from them (:func:`~vitcompress.report.build`), which fails when a
required section is missing instead of producing a report that readers cannot parse.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.render import markdown
from vitcompress.report import build


def run(ctx: RunContext) -> None:
    ctx.report.timings = ctx.clock.timings()  # the stages so far; the API adds the last ones when they finish
    report = build(ctx.report)
    (ctx.work_dir / "report.json").write_text(report.dump_json())
    (ctx.work_dir / "report.md").write_text(markdown(report))
