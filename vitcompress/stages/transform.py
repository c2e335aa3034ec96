"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted."""

from __future__ import annotations

from torch import nn

from vitcompress.context import RunContext
from vitcompress.stages.load import calibration_batches
from vitcompress.stages.measure import count_params
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformInputs


def run(ctx: RunContext) -> None:
    ctx.report["steps"] = apply_steps(ctx, ctx.model, ctx.recipe.model_steps)


def apply_steps(ctx: RunContext, model: nn.Module, steps: list) -> list[dict]:
    """Apply ``steps`` to ``model`` in place; per step what it converted (and its ``details``, if any)."""
    results = []
    for i, step in enumerate(steps):
        inputs = TransformInputs(calibration_batches=lambda: calibration_batches(ctx))
        transform = registry.get(step.transform)
        before = count_params(model)
        ctx.progress.stage("transform", f"step {i}: {step.transform}")
        converted = transform.apply(model, step, inputs)
        results.append({"step": i, "transform": step.transform, "modules": converted,
                        "params_before": before, "params_after": count_params(model)})
        if inputs.details:
            results[-1]["details"] = inputs.details
    model.eval()
    return results
