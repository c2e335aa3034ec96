"""Stage 5c — profile: where each model's time goes, per transformer block, in onnxruntime's profiler.

A few profiled runs of the original and the converted ONNX (the files the validation just timed), interleaved,
at the first validation batch size; each node's time is attributed to its block, sub-module and recipe step
(:mod:`vitcompress.profile`). The report gets ``profile.original`` and ``profile.converted``.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.deploy.timing_lock import latency_lock
from vitcompress.profile import profile_models


def run(ctx: RunContext) -> None:
    config = ctx.recipe.validate_
    if config.profile_runs == 0:
        return
    batch = config.batch_sizes[0]
    ctx.progress.stage("profile", f"onnxruntime profiler, batch {batch}, {config.profile_runs} runs per model")
    with latency_lock("profile"):
        ctx.report.profile = profile_models(
            {"original": ctx.original_onnx_path, "converted": ctx.onnx_path},
            {"converted": [step.model_dump() for step in ctx.report.steps]},
            batch_size=batch, runs=config.profile_runs, warmup_runs=config.warmup_runs, threads=config.threads)
