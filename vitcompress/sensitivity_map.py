"""Sensitivity map: each recipe step applied alone to each group of transformer blocks, training-free, with its
accuracy cost (torch top-1 and agreement with the original) and its measured latency gain in onnxruntime.

:func:`sensitivity` splits ``model.blocks`` into contiguous groups. For every recipe step and group it copies the
original, applies only that step restricted to the group's blocks (an ``ignore`` selector removes every module
outside ``blocks.{i}`` for i in the group), runs the validation images through it in torch, exports it with the
recipe's export settings and times it against the original's export, interleaved, at one batch size. Nothing is
fine-tuned; ``export.quantize`` is not applied (both models are timed in float32). A step that selects nothing in
a group is a cell with ``applicable: false`` and the reason, not an error. ``vitcompress sensitivity`` writes the
result as ``sensitivity.json``: ``vitcompress tune`` maps its probe steps with it and seeds its first trials from
the map (:mod:`vitcompress.search.seeds`), and report.html draws it as a block × step heat map
(``convert --sensitivity``, :mod:`vitcompress.sensitivity_file`).
"""

from __future__ import annotations

import copy
import datetime
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader

from vitcompress.context import ConvertSettings, RunContext
from vitcompress.errors import ModelError, RecipeError, TargetError, UsageError
from vitcompress.evaluate import EVAL_BATCH, latency, latency_images, top1, torch_logits
from vitcompress.measure import machine_description
from vitcompress.models import chosen_name, load_model
from vitcompress.pipeline import calibration_batches, export_model, load_data
from vitcompress.progress import LogProgress, Progress
from vitcompress.recipe import Recipe, recipe_argument
from vitcompress.transforms.apply import apply_steps
from vitcompress.transforms.registry import TransformConfig
from vitcompress.transforms.select import select_modules

DEFAULT_GROUPS = 4
DEFAULT_IMAGES = 500
DEFAULT_RUNS = 10


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MappedModel(_Part):
    name: str
    weights: str
    blocks: int = Field(description="transformer blocks (len(model.blocks))")


class AppliedCell(_Part):
    """One step on one block group: what it converted, its accuracy cost and its measured latency gain."""

    group: int
    blocks: list[int]
    applicable: Literal[True] = True
    modules: list[str]
    top1: float | None = Field(description="torch top-1 (%) of the variant; None without labels")
    top1_drop: float | None = Field(description="the original's top-1 − the variant's, in points")
    agreement: float = Field(description="share of images whose top-1 class equals the original's (0–1)")
    latency_ms: float = Field(description="p50 of the variant in onnxruntime")
    original_ms: float = Field(description="p50 of the original, timed interleaved with the variant")
    speedup: float = Field(description="original_ms / latency_ms")
    spread: float = Field(description="(p90 − p10) / p50 of the variant's runs")
    original_spread: float


class SkippedCell(_Part):
    """One step on one block group that selects nothing there (or cannot be restricted to it): ``reason`` says why."""

    group: int
    blocks: list[int]
    applicable: Literal[False] = False
    reason: str


class StepSensitivity(_Part):
    step: int
    transform: str
    cells: list[AppliedCell | SkippedCell]


class Sensitivity(_Part):
    """What :func:`sensitivity` measured: per recipe step, one cell per block group."""

    model: MappedModel
    recipe: dict = Field(description="the resolved recipe")
    recipe_source: str
    data: str
    images: int = Field(description="validation images the accuracy numbers are computed on")
    labelled: bool
    original_top1: float | None
    groups: list[list[int]]
    machine: str
    date: str
    threads: int
    batch_size: int
    runs: int
    steps: list[StepSensitivity]


def block_groups(depth: int, groups: int) -> list[list[int]]:
    """``range(depth)`` split into ``groups`` contiguous groups, the first ones one block longer when uneven."""
    if not 1 <= groups <= depth:
        raise UsageError(f"--groups {groups}: the model has {depth} blocks, so 1 to {depth} groups")
    size, extra = divmod(depth, groups)
    starts = [g * size + min(g, extra) for g in range(groups + 1)]
    return [list(range(starts[g], starts[g + 1])) for g in range(groups)]


def outside_selector(blocks: list[int]) -> str:
    """A selector matching every module that is not ``blocks.{i}`` or under it, for i in ``blocks``."""
    return rf"re:(?!blocks\.(?:{'|'.join(map(str, blocks))})(?:\.|$)).*"


def restrict(step: TransformConfig, blocks: list[int]) -> TransformConfig:
    """A copy of ``step`` that converts only modules under ``blocks.{i}`` for i in ``blocks``."""
    return step.model_copy(update={"ignore": [*step.ignore, outside_selector(blocks)]})


def block_count(model: nn.Module, name: str) -> int:
    """``len(model.blocks)``; a :class:`ModelError` for a model without a sequence of transformer blocks."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ModelError(f"{name} has no transformer blocks (model.blocks): sensitivity maps a timm ViT's blocks")
    return len(blocks)


def _labels(dataset) -> np.ndarray:
    return np.concatenate([labels.numpy() for _, labels in DataLoader(dataset, batch_size=EVAL_BATCH)])


def _cell_line(step: int, transform: str, cell: AppliedCell | SkippedCell) -> str:
    span = f"block {cell.blocks[0]}" if len(cell.blocks) == 1 else f"blocks {cell.blocks[0]}-{cell.blocks[-1]}"
    where = f"step {step} {transform}, {span}"
    if isinstance(cell, SkippedCell):
        return f"{where}: not applicable ({cell.reason})"
    accuracy = f"top-1 drop {cell.top1_drop:+.2f}, " if cell.top1_drop is not None else ""
    return (f"{where}: {len(cell.modules)} modules, {accuracy}agreement {cell.agreement:.3f}, "
            f"{cell.latency_ms:.2f} ms vs {cell.original_ms:.2f} ms ({cell.speedup:.2f}×)")


def sensitivity(
    model: str | None,
    recipe: str | Path | Recipe,
    *,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    random_init: bool = False,
    model_args: dict | None = None,
    groups: int = DEFAULT_GROUPS,
    images: int = DEFAULT_IMAGES,
    batch_size: int = 1,
    runs: int = DEFAULT_RUNS,
    progress: Progress | None = None,
) -> Sensitivity:
    """Measure every recipe step on every group of ``groups`` contiguous blocks alone; returns the
    :class:`Sensitivity` map.

    ``model``, ``recipe``, ``checkpoint``, ``data``, ``overrides``, ``random_init`` and ``model_args`` are
    ``convert``'s. ``images`` caps the validation images (the recipe's ``validate.images`` when smaller);
    ``batch_size`` and ``runs`` are the latency's (with the recipe's threads and warm-up). Bad input (unknown
    model, bad or cascade recipe, a model without ``blocks``, ``groups`` outside 1 … blocks) raises a
    :class:`~vitcompress.errors.VitCompressError` with exit code 2.
    """
    recipe, recipe_source = recipe_argument(recipe, overrides)
    if recipe.cascade is not None:
        raise RecipeError(f"{recipe_source}: a cascade recipe builds two models; sensitivity maps the steps of one "
                          "(give them as steps:)")
    if not recipe.model_steps:
        raise RecipeError(f"{recipe_source}: the recipe has no steps to map")
    if groups < 1:
        raise UsageError(f"--groups {groups}: at least one group")
    validate = recipe.validate_
    validate = validate.model_copy(update={"images": min(images, validate.images or images),
                                           "batch_sizes": [batch_size]})
    recipe = recipe.model_copy(update={"validate_": validate})
    name = chosen_name(model, recipe.model)
    progress = progress or LogProgress()
    progress.stage("load", name)
    loaded = load_model(name, Path(checkpoint) if checkpoint else None, random_init, model_args)
    loaded.model.requires_grad_(False)
    cells_of = block_groups(block_count(loaded.model, loaded.name), groups)
    for i, step in enumerate(recipe.model_steps):  # a selector that matches nothing at all is the recipe's error
        select_modules(loaded.model, step.targets, step.ignore, (nn.Module,), f"step {i} ({step.transform})")
    with tempfile.TemporaryDirectory(prefix="vitcompress-sensitivity-") as tmp:
        settings = ConvertSettings(model=name, out_dir=Path(tmp), checkpoint=Path(checkpoint) if checkpoint else None,
                                   data=data, random_init=random_init, model_args=dict(model_args or {}))
        ctx = RunContext(settings=settings, recipe=recipe, work_dir=Path(tmp), scratch_dir=Path(tmp),
                         progress=progress, original=loaded, model=loaded.model)
        ctx.data = load_data(ctx)
        val = ctx.data.val
        labels = _labels(val)
        original_classes = torch_logits(loaded.model, val, len(val)).argmax(-1)
        original_top1 = top1(original_classes, labels)
        timed_on = latency_images(val, batch_size)
        progress.stage("export", f"the original, ONNX opset {recipe.export.opset}")
        original_onnx = export_model(ctx, loaded.model, Path(tmp) / "original.onnx")

        def measure(step: int, blocks: list[int], group: int) -> AppliedCell | SkippedCell:
            variant = copy.deepcopy(loaded.model)
            try:
                applied = apply_steps(variant, [restrict(recipe.model_steps[step], blocks)],
                                      lambda where: lambda: calibration_batches(ctx))[0]
            except TargetError as exc:
                return SkippedCell(group=group, blocks=blocks, reason=str(exc))
            variant.eval()
            classes = torch_logits(variant, val, len(val)).argmax(-1)
            accuracy = top1(classes, labels)
            path = export_model(ctx, variant, Path(tmp) / "variant.onnx")
            timing = latency({"original": original_onnx, "variant": path}, validate, timed_on, runs)
            mine, theirs = timing["variant"][batch_size], timing["original"][batch_size]
            return AppliedCell(
                group=group, blocks=blocks, modules=applied.modules, top1=accuracy,
                top1_drop=None if accuracy is None else original_top1 - accuracy,
                agreement=float((classes == original_classes).mean()), latency_ms=mine["p50_ms"],
                original_ms=theirs["p50_ms"], speedup=theirs["p50_ms"] / mine["p50_ms"], spread=mine["spread"],
                original_spread=theirs["spread"])

        steps = []
        for i, step in enumerate(recipe.model_steps):
            cells = []
            for group, blocks in enumerate(cells_of):
                cells.append(measure(i, blocks, group))
                progress.stage("cell", _cell_line(i, step.transform, cells[-1]))
            steps.append(StepSensitivity(step=i, transform=step.transform, cells=cells))
    return Sensitivity(
        model=MappedModel(name=loaded.name, weights=loaded.weights, blocks=sum(map(len, cells_of))),
        recipe=recipe.model_dump(mode="json", by_alias=True), recipe_source=recipe_source, data=ctx.data.name,
        images=len(val), labelled=original_top1 is not None, original_top1=original_top1, groups=cells_of,
        machine=machine_description(), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        threads=validate.threads, batch_size=batch_size, runs=runs, steps=steps)
