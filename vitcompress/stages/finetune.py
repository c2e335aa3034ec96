"""Stage 3 — fine-tune: brief distillation of the converted student from the frozen original
(:mod:`vitcompress.training.loop`), stage by stage with ``finetune.stages``, checkpointed with ``checkpoint_every``."""

from __future__ import annotations

from vitcompress.context import RunContext
from vitcompress.pipeline import finetune


def run(ctx: RunContext) -> None:
    finetune(ctx)
