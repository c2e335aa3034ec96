"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted."""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.stages.load import calibration_batches
from vitcompress.stages.measure import count_params
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformInputs


def run(ctx: RunContext) -> None:
    inputs = TransformInputs(calibration_batches=lambda: calibration_batches(ctx))
    results = []
    for i, step in enumerate(ctx.recipe.steps):
        transform = registry.get(step.transform)
        before = count_params(ctx.model)
        ctx.progress.stage("transform", f"step {i}: {step.transform}")
        converted = transform.apply(ctx.model, step, inputs)
        results.append({"step": i, "transform": step.transform, "modules": converted,
                        "params_before": before, "params_after": count_params(ctx.model)})
    ctx.model.eval()
    ctx.report["steps"] = results
