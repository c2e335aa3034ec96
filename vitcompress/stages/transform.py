"""Stage 2 — transform: apply the recipe's steps in order, recording what each one converted.

Steps that a staged fine-tune (``finetune.stages``) applies later are left to the fine-tune stage.
"""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.pipeline import apply_steps
from vitcompress.recipe import staged_steps


def run(ctx: RunContext) -> None:
    steps = ctx.recipe.model_steps
    later = {i for stage in staged_steps(ctx.recipe) for i in stage}
    ctx.report.steps = apply_steps(ctx, ctx.model, steps, [i for i in range(len(steps)) if i not in later])
