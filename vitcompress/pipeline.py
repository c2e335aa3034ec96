"""The work that more than one stage does on a run's context: resolving its data and calibration images, exporting
its models with the run's settings and metadata, applying recipe steps, and the (staged) fine-tune.

Stages never import each other (docs/architecture.md); what two of them share lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vitcompress.context import RunContext
from vitcompress.data import DataBundle, first_images, resolve_data
from vitcompress.deploy.runtime import preprocessing_metadata
from vitcompress.errors import DataError
from vitcompress.export import export_onnx
from vitcompress.labels import display_names
from vitcompress.models import default_data, model_classes
from vitcompress.original_cache import model_digest
from vitcompress.recipe import Recipe, staged_steps
from vitcompress.report import Finetune, Step
from vitcompress.training import loop
from vitcompress.transforms import apply as transforms_apply
from vitcompress.transforms import select


def load_data(ctx: RunContext) -> DataBundle:
    """The data of ``--data``, or the model's default (:func:`default_data`), for the loaded model."""
    settings = ctx.settings
    spec = settings.data or default_data(ctx.original.name, settings.random_init)
    if settings.labels is not None and spec in ("fmnist", "synthetic"):
        raise DataError(f"--labels maps the class folders of an image directory; --data {spec} has none")
    data = resolve_data(spec, ctx.original.data_config, ctx.recipe.validate_.images, model_classes(ctx.original),
                        settings.labels, ctx.recipe.validate_.holdout_fraction)
    if len(data.val) == 0:
        raise DataError(f"data {spec!r} has no validation images")
    return data


def calibration_batches(ctx: RunContext):
    """The first ``calibration.images`` training images in batches (deterministic).

    A context without data (``vitcompress plan``) loads it here, so only transforms that calibrate need it."""
    if ctx.data is None:
        ctx.data = load_data(ctx)
    cal = ctx.recipe.calibration
    return first_images(ctx.data.train, cal.images, cal.batch_size)


def run_metadata(ctx: RunContext) -> dict[str, str]:
    """The ONNX metadata of this run's files: preprocessing, class names (:func:`~vitcompress.labels.display_names`:
    the model's, ImageNet's or the data's folders') and the model name."""
    names = display_names(int(ctx.original.model.num_classes), ctx.original.class_names,
                          ctx.data.folder_names if ctx.data is not None else None)
    metadata = preprocessing_metadata(ctx.original.data_config, names)
    metadata["vitcompress.model"] = ctx.original.name
    return metadata


def export_model(ctx: RunContext, model: nn.Module, path: Path) -> Path:
    """``model`` to ONNX at ``path`` with the recipe's export settings and this run's metadata."""
    return export_onnx(model, path, input_size=tuple(ctx.original.data_config["input_size"]),
                       config=ctx.recipe.export, metadata=run_metadata(ctx))


def export_original(ctx: RunContext) -> Path:
    """The original model's ONNX in the scratch directory, for timing side by side with the converted one (also
    what ``vitcompress batch`` re-creates to re-measure a finished bundle on another machine). An identical
    original exported earlier is reused from ``ctx.cache`` (:class:`~vitcompress.original_cache.OriginalCache`)."""
    config = ctx.recipe.export
    key = repr((model_digest(ctx.original.model), tuple(ctx.original.data_config["input_size"]),
                config.opset, config.dynamic_batch, sorted(run_metadata(ctx).items())))
    return ctx.cache.exported(key, ctx.original_onnx_path, lambda path: export_model(ctx, ctx.original.model, path))


def apply_steps(ctx: RunContext, model: nn.Module, steps: list, indices: list[int] | None = None) -> list[Step]:
    """Apply ``steps`` (those at ``indices``, default all) to ``model`` in place with this run's calibration images
    (:func:`vitcompress.transforms.apply.apply_steps`), then put it in eval mode; per step what it converted."""
    results = transforms_apply.apply_steps(model, steps, lambda where: lambda: calibration_batches(ctx),
                                           indices=indices, progress=ctx.progress)
    model.eval()
    return results


def concrete_recipe(model: nn.Module, recipe: Recipe) -> Recipe:
    """``recipe`` as it applies to ``model``: every role and relative-depth selector of its steps (and cascade
    steps) replaced by the exact module names it matches (:func:`vitcompress.transforms.apply.concrete_steps`),
    the form ``recipe.resolved.yaml`` records. Checking every step's selectors here fails a recipe before any work.

    Raises:
        TargetError: a selector that matches no module of ``model``.
    """
    if recipe.cascade is None:
        return recipe.model_copy(update={"steps": transforms_apply.concrete_steps(model, recipe.steps)})
    cascade = recipe.cascade
    update: dict[str, Any] = {"low": transforms_apply.concrete_steps(
        model, cascade.low, [f"cascade.low step {i} ({s.transform})" for i, s in enumerate(cascade.low)])}
    if isinstance(cascade.high, list):
        update["high"] = transforms_apply.concrete_steps(
            model, cascade.high, [f"cascade.high step {i} ({s.transform})" for i, s in enumerate(cascade.high)])
    return recipe.model_copy(update={"cascade": cascade.model_copy(update=update)})


def finetune(ctx: RunContext, saver: loop.Checkpoints | None = None) -> Finetune | None:
    """Fine-tune ``ctx.model`` from the original (:func:`vitcompress.training.loop.train`); returns the report's
    ``finetune`` section (None without a ``finetune`` recipe section).

    Staged (``finetune.stages``, as ShiftAddViT's attention-then-MoE schedule): each stage first applies its group
    of recipe steps (added to ``ctx.report.steps``), then trains ``steps`` optimizer steps; the section sums the
    stages and lists each. ``saver``: the conversion's checkpoints (and ``--resume``); None for a second model of
    the same conversion (the cascade's high-effort one), which is not checkpointed."""
    config = ctx.recipe.finetune
    if config is None:
        return None
    resume = saver.resume_state() if saver else None

    def train(**where: Any) -> dict:
        return loop.train(ctx.model, ctx.original.model, ctx.data.train, config, place=ctx.dist,
                          progress=ctx.progress, saver=saver, **where).model_dump()

    stages = staged_steps(ctx.recipe)
    if not stages:
        return Finetune.model_validate(train(resume=resume))
    results: list[dict] = []
    for number, indices in enumerate(stages):
        ctx.report.steps += apply_steps(ctx, ctx.model, ctx.recipe.model_steps, indices)
        if results and results[-1]["stopped"]:
            continue  # a stopped stage ends training, but the recipe's transforms are all still applied
        if resume is not None and number < resume.stage:
            results.append(resume.progress["done"][number])  # finished before the interruption
            continue
        results.append({"transforms": config.stages[number], **train(
            label=f"stage {number + 1}/{len(stages)}", stage=number, done=results,
            resume=resume if resume is not None and resume.stage == number else None)})
    seconds = sum(r["seconds"] for r in results)
    steps_done = sum(r["steps_done"] for r in results)
    last = results[-1]
    return Finetune.model_validate({
        "steps_done": steps_done, "steps_budget": config.steps * len(stages),
        "first_loss": results[0]["first_loss"], "last_loss": last["last_loss"], "seconds": seconds,
        "images_per_second": steps_done * config.batch_size / max(seconds, 1e-9), "stopped": last["stopped"],
        **{key: last[key] for key in ("device", "world_size", "per_rank_batch", "backend", "precision", "workers")},
        "skipped_images": sum(r["skipped_images"] for r in results),
        "resumed_from_step": resume.step if resume is not None else None, "stages": results,
    })


def resolved_selectors_note(recipe: Recipe) -> str:
    """The YAML comment above a resolved recipe whose role or relative-depth selectors were replaced by the
    modules they matched: the selectors as written."""
    groups = [("steps", recipe.steps)] if recipe.cascade is None else [("cascade.low", recipe.cascade.low)]
    if recipe.cascade is not None and isinstance(recipe.cascade.high, list):
        groups.append(("cascade.high", recipe.cascade.high))
    lines = ["role and relative-depth selectors resolved on this model; as written in the recipe:"]
    for group, steps in groups:
        for i, step in enumerate(steps):
            for key in ("targets", "ignore"):
                selectors = getattr(step, key)
                if any(select.parse_selector(x).is_model_relative for x in selectors):
                    lines.append(f"{group}.{i}.{key}: {selectors}")
    return "".join(f"# {line}\n" for line in lines)
