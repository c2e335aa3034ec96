"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted.

Steps that a staged fine-tune (``finetune.stages``) applies later are left to the fine-tune stage.
"""

from __future__ import annotations

from torch import nn

from vitcompress.context import RunContext
from vitcompress.recipe import staged_steps
from vitcompress.stages.load import calibration_batches
from vitcompress.stages.measure import count_params
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformInputs


def run(ctx: RunContext) -> None:
    steps = ctx.recipe.model_steps
    later = {i for stage in staged_steps(ctx.recipe) for i in stage}
    ctx.report["steps"] = apply_steps(ctx, ctx.model, steps, [i for i in range(len(steps)) if i not in later])


def apply_steps(ctx: RunContext, model: nn.Module, steps: list, indices: list[int] | None = None) -> list[dict]:
    """Apply ``steps`` (those at ``indices``, default all) to ``model`` in place; per step what it converted
    (and its ``details``, if any)."""
    results = []
    for i in range(len(steps)) if indices is None else indices:
        step = steps[i]
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
