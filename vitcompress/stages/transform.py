"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted.

Steps that a staged fine-tune (``finetune.stages``) applies later are left to the fine-tune stage.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.recipe import staged_steps
from vitcompress.stages.load import calibration_batches
from vitcompress.stages.measure import count_params
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformInputs


def run(ctx: RunContext) -> None:
    later = {i for stage in staged_steps(ctx.recipe) for i in stage}
    ctx.report["steps"] = []
    apply_steps(ctx, [i for i in range(len(ctx.recipe.steps)) if i not in later])
    ctx.model.eval()


def apply_steps(ctx: RunContext, indices: list[int]) -> None:
    """Apply the recipe steps at ``indices`` to ``ctx.model``, appending what they did to ``report["steps"]``."""
    inputs = TransformInputs(calibration_batches=lambda: calibration_batches(ctx))
    for i in indices:
        step = ctx.recipe.steps[i]
        transform = registry.get(step.transform)
        before = count_params(ctx.model)
        ctx.progress.stage("transform", f"step {i}: {step.transform}")
        converted = transform.apply(ctx.model, step, inputs)
        ctx.report["steps"].append({"step": i, "transform": step.transform, "modules": converted,
                                    "params_before": before, "params_after": count_params(ctx.model)})
