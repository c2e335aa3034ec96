"""Stage 3 — fine-tune: brief distillation of the converted student from the frozen original
(:mod:`vitcompress.training.loop`), stage by stage with ``finetune.stages``, checkpointed with ``checkpoint_every``."""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.pipeline import finetune
from vitcompress.training.loop import Checkpoints


def run(ctx: RunContext) -> None:
    """Fine-tune ``ctx.model``, checkpointed beside the output (``--resume`` continues from there); writes the
    report's ``finetune`` section."""
    config = ctx.recipe.finetune
    saver = None if config is None else Checkpoints(ctx.checkpoint_dir, config.checkpoint_every,
                                                    resume=ctx.settings.resume, place=ctx.dist)
    ctx.report.finetune = finetune(ctx, saver)
