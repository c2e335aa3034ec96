"""Re-measure a finished bundle's latency on this machine, without converting again.

``vitcompress batch`` keys latency on a machine fingerprint (CPU, cores, ORT threads and version) and the timing
settings on top of the conversion key. When only those changed, the converted model is still right; only its
timings are not. This stage loads the original model again (same name, weights and architecture arguments),
exports its ONNX the way the export stage does, times it interleaved against the bundle's own ``model.onnx``
(:func:`~vitcompress.evaluate.latency`, under the machine's latency lock), profiles both
again when the recipe profiles, and rewrites what depends on the timings: ``report.json`` (latency fields,
``validation.threads``, ``machine``, a ``remeasured`` note; everything else kept), ``report.md``, the timing
part of ``inference.json``, ``SHA256SUMS``, then the page built from them (``report.html``). ``model.onnx`` and
every other file stay byte for byte.

Each file is replaced atomically; if the process dies between two files, the batch's cache record still names
the old machine, so the next batch run re-measures again (``vitcompress verify`` fails until then).

A cascade bundle is not re-measured here: its expected latencies and operating points come from the cascade
stage's own measurements, so the batch converts it again.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.deploy.bundle import update_inference_timing, write_checksums
from vitcompress.errors import UsageError
from vitcompress.evaluate import latency, latency_images
from vitcompress.files import replace_text
from vitcompress.models import load_model
from vitcompress.page.report_page import write_report_page
from vitcompress.pipeline import export_original, load_data
from vitcompress.render import markdown
from vitcompress.report import Remeasured, Report, Sections, build
from vitcompress.stages import profile


def check(ctx: RunContext, old: Report) -> None:
    """The bundle was made from this recipe's kind of run: one model (no cascade), the same model name."""
    if ctx.recipe.cascade is not None or old.cascade is not None:
        raise UsageError("a cascade bundle's latency is measured inside its conversion: convert it again")
    if old.model.name != ctx.original.name:
        raise UsageError(f"{ctx.work_dir} holds a conversion of {old.model.name}, not {ctx.original.name}")


def measure(ctx: RunContext) -> None:
    """Time the re-exported original against the bundle's model.onnx; the new timings go into ``ctx.report``."""
    config = ctx.recipe.validate_
    export_original(ctx)
    ctx.progress.stage("latency", f"batch sizes {config.batch_sizes}, {config.latency_runs} interleaved runs, "
                                  f"{config.threads} threads")
    timing = latency({"original": ctx.original_onnx_path, "converted": ctx.onnx_path}, config,
                     latency_images(ctx.data.val, max(config.batch_sizes)))
    section = ctx.report.validation
    section.threads = config.threads
    for name, measured in timing.items():
        section.models[name].latency = measured
    ctx.report.profile = None  # another machine's profile: measured again, or dropped
    profile.run(ctx)


def run(ctx: RunContext, machine: str, date: str, reason: str) -> Report:
    """Re-measure the bundle in ``ctx.work_dir`` (``ctx.settings`` name the job's model, weights and data) on
    ``machine``; returns the rewritten report."""
    old = Report.load(ctx.work_dir)
    settings = ctx.settings
    ctx.original = load_model(settings.model, settings.checkpoint, settings.random_init, settings.model_args)
    check(ctx, old)
    ctx.data = load_data(ctx)
    ctx.report = Sections.of(old.model_copy(deep=True))
    measure(ctx)
    ctx.report.machine = machine
    ctx.report.remeasured = Remeasured(date=date, reason=reason, converted_on=old.machine, converted_date=old.date)
    report = build(ctx.report)
    replace_text(ctx.work_dir / "report.json", report.dump_json())
    replace_text(ctx.work_dir / "report.md", markdown(report))
    converted = report.validation.models["converted"].latency
    update_inference_timing(ctx.work_dir, ctx.recipe.validate_.threads,
                            {batch: timing.model_dump() for batch, timing in converted.items()})
    write_checksums(ctx.work_dir)
    write_report_page(ctx.work_dir)  # the page shows the new timings
    return report
