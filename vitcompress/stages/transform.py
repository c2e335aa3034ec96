"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted.

Steps that a staged fine-tune (``finetune.stages``) applies later are left to the fine-tune stage. With a ladder
(``validate.ladder_images``), the transformed model is measured here, before any fine-tuning changes it.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.ladder import torch_pass
from vitcompress.pipeline import apply_steps, concrete_recipe
from vitcompress.recipe import staged_steps


def run(ctx: RunContext) -> None:
    ctx.resolved_recipe = concrete_recipe(ctx.model, ctx.recipe)  # every step's selectors checked before any work
    steps = ctx.recipe.model_steps
    later = {i for stage in staged_steps(ctx.recipe) for i in stage}
    ctx.report.steps = apply_steps(ctx, ctx.model, steps, [i for i in range(len(steps)) if i not in later])
    for step in ctx.report.steps:
        ctx.clock.add_part(f"step {step.step} {step.transform}", step.seconds)
    images = ctx.recipe.validate_.ladder_images
    if images and not later and ctx.dist.is_main:
        ctx.progress.stage("ladder", f"the transformed model in torch on {min(images, len(ctx.data.val))} "
                                     "validation images, before fine-tuning")
        with ctx.clock.part("ladder (transformed, torch)"):
            ctx.rungs["transformed"] = torch_pass(ctx.model, ctx.data.val, images)
