"""Stage 1 — load: the original model (teacher, frozen), the student copy, and the data.

The API may have set ``ctx.original`` (an in-memory module) and ``ctx.data`` (an in-memory dataset) already."""

from __future__ import annotations

import copy
import dataclasses

from vitcompress.context import RunContext
from vitcompress.models import load_model
from vitcompress.pipeline import load_data
from vitcompress.report import DataInfo, DataSplit, ModelInfo


def run(ctx: RunContext) -> None:
    settings = ctx.settings
    ctx.original = ctx.original or load_model(settings.model, settings.checkpoint, settings.random_init,
                                                 settings.model_args)
    ctx.original.model.requires_grad_(False)
    ctx.model = copy.deepcopy(ctx.original.model)
    ctx.data = ctx.data or load_data(ctx)
    ctx.report.model = ModelInfo(name=ctx.original.name, weights=ctx.original.weights,
                                 input_size=list(ctx.original.data_config["input_size"]),
                                 source=settings.model_source, model_args=settings.model_args or None)
    split = ctx.data.split
    ctx.report.data = DataInfo(name=ctx.data.name, train_images=len(ctx.data.train), val_images=len(ctx.data.val),
                               labelled=ctx.data.labelled, classes=ctx.data.classes,
                               split=None if split is None else DataSplit(**dataclasses.asdict(split)))
