"""Python API: :func:`apply` (transform steps on a module, in place) and :func:`convert` (the whole pipeline).

``apply`` is the torchao-style one-liner: ``vitcompress.apply(model, vitcompress.TaylorConfig())``.
``convert`` runs load → transform → finetune → export → validate → report, like llm-compressor's ``oneshot``:
on a model name or an in-memory timm ViT (never changed), writing into ``out_dir`` or a temporary directory.

The output directory is written atomically (:class:`~vitcompress.outdir.OutputTransaction`): all files go to a
hidden sibling directory that is renamed to ``out_dir`` only when every stage has finished, so a failed or
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitcompress import remeasure
from vitcompress.context import ConvertSettings, DeployOptions, RunContext
from vitcompress.data import DataBundle, in_memory_bundle
from vitcompress.deploy.bundle import write_checksums
from vitcompress.deploy.optimize import check_options
from vitcompress.errors import DataError, ModelError, OutputError, RecipeError
from vitcompress.labels import read_label_mapping
from vitcompress.measure import machine_description
from vitcompress.models import LoadedModel, check_model_args, chosen_name
from vitcompress.original_cache import OriginalCache
from vitcompress.outdir import OutputTransaction, check_out_dir, is_bundle, output_lock
from vitcompress.pipeline import resolved_selectors_note
from vitcompress.progress import LogProgress, Progress
from vitcompress.recipe import CalibrationConfig, Recipe, dump_recipe, load_recipe, recipe_argument
from vitcompress.render import markdown
from vitcompress.report import Report
from vitcompress.sensitivity_file import read_sensitivity
from vitcompress.stages import (
    bundle,
    cascade,
    export,
    finetune,
    ladder,
    load,
    page,
    profile,
    report,
    transform,
    validate,
)
from vitcompress.training import checkpoint, distributed
from vitcompress.transforms.apply import apply_steps
from vitcompress.transforms.registry import TransformConfig

STAGES = (load, transform, finetune, export, validate, ladder, cascade, profile, report, bundle, page)
#: The stages every rank of a torchrun job runs; rank 0 alone runs the rest (and writes).
TRAINING_STAGES = (load, transform, finetune)
IN_MEMORY_WEIGHTS = "in-memory module"

Steps = Union[TransformConfig, Sequence[TransformConfig], Recipe, str, Path]
Calibration = Union[torch.Tensor, Dataset, Iterable[Any], Callable[[], Iterable[Any]], None]


# ---------------------------------------------------------------------------------------------------- apply


def apply(model: nn.Module, steps: Steps, calibration: Calibration = None) -> nn.Module:
    """Apply transform steps to ``model`` in place and return it (torchao's ``quantize_(model, config)``).

    The model keeps its train/eval mode (the new layers follow it). Nothing is fine-tuned or exported: use
    :func:`convert` for the whole pipeline.

    Args:
        model: a timm Vision Transformer (or any module whose names the steps' ``targets`` select).
        steps: one transform config (e.g. ``TaylorConfig()``), a list of them applied in order, a
            :class:`~vitcompress.recipe.Recipe`, or the path of a recipe file (its ``steps``).
        calibration: images for steps that calibrate (SVD whitening, CKA skip selection): a DataLoader or any
            re-iterable of image batches or ``(images, labels)`` batches, a one-shot iterator (read once and
            kept), a function returning fresh batches, a torch Dataset or an image tensor (N, C, H, W) (their
            first ``calibration.images`` images in batches of ``calibration.batch_size``: the recipe's, or the
            defaults), or None when no step calibrates.

    Returns:
        ``model`` itself, converted.

    Raises:
        TargetError: a step's targets match no module (or only modules it cannot convert).
        RecipeError: a cascade recipe (two models: use :func:`convert`, or apply ``recipe.cascade.low``), an
            invalid recipe file, or something that is not a transform config.
        DataError: a step needs calibration images and ``calibration`` is None or holds no images.
    """
    apply_recipe(model, steps, calibration)
    return model


def apply_recipe(model: nn.Module, steps: Steps, calibration: Calibration = None) -> list[list[str]]:
    """:func:`apply`, returning instead the names of the modules each step converted (same arguments)."""
    recipe = _as_recipe(steps)
    was_training = model.training
    try:
        applied = apply_steps(model, recipe.steps,
                              lambda where: _calibration_batches(calibration, recipe.calibration, where))
    finally:
        model.train(was_training)
    return [step.modules for step in applied]


def _as_recipe(steps: Steps) -> Recipe:
    """The recipe whose ``steps`` to apply: ``steps`` itself, loaded from a file, or wrapping configs."""
    if isinstance(steps, (str, Path)):
        steps = load_recipe(steps)
    if isinstance(steps, Recipe):
        if steps.cascade is not None:
            raise RecipeError("apply() applies one model's steps, and this is a cascade recipe (a low- and a "
                              "high-effort model): use vitcompress.convert(), or apply(model, recipe.cascade.low) "
                              "for the low-effort model alone")
        return steps
    configs = [steps] if isinstance(steps, TransformConfig) else list(steps)
    for i, config in enumerate(configs):
        if not isinstance(config, TransformConfig):
            raise RecipeError(f"step {i}: expected a transform config (e.g. vitcompress.TaylorConfig()), "
                              f"got {type(config).__name__}")
    return Recipe(steps=configs)


def _calibration_batches(calibration: Calibration, config: CalibrationConfig, step: str) -> Callable[[], Iterable]:
    """A function returning a fresh iterable of image tensors on each call, from what ``apply`` accepts."""
    if calibration is None:
        def missing() -> Iterable[torch.Tensor]:
            raise DataError(f"{step} needs calibration images: pass calibration= (a DataLoader or iterable of "
                            "image batches, or a torch Dataset)")
        return missing
    if isinstance(calibration, torch.Tensor):
        return lambda: _images(calibration[: config.images].split(config.batch_size), step)
    if isinstance(calibration, Dataset) and hasattr(calibration, "__len__"):
        subset = Subset(calibration, range(min(config.images, len(calibration))))
        loader = DataLoader(subset, batch_size=config.batch_size, shuffle=False)
        return lambda: _images(loader, step)
    if callable(calibration):
        return lambda: _images(calibration(), step)
    if iter(calibration) is calibration:  # a one-shot iterator: keep its batches for every pass
        calibration = list(calibration)
    return lambda: _images(calibration, step)


def _images(batches: Iterable[Any], step: str) -> Iterable[torch.Tensor]:
    """The image tensor of each batch (the first item of an ``(images, labels)`` batch)."""
    count = 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor):
            raise DataError(f"{step}: calibration batches must be image tensors or (images, labels), "
                            f"got {type(images).__name__}")
        count += 1
        yield images
    if count == 0:
        raise DataError(f"{step}: the calibration data holds no images")


# -------------------------------------------------------------------------------------------------- convert


@dataclass
class ConvertResult:
    """What :func:`convert` made: the converted module, its report, and where the files are. On the ranks of a
    torchrun job other than 0, which only train, ``report`` is None and nothing was written."""

    model: nn.Module = field(repr=False)
    report: Report | None = field(repr=False)
    onnx_path: Path
    out_dir: Path


def convert(
    model: str | nn.Module | None,
    recipe: str | Path | Recipe,
    *,
    data: str | Dataset | tuple[Dataset, Dataset] | None = None,
    out_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    random_init: bool = False,
    labels: str | Path | None = None,
    progress: Progress | None = None,
    deploy: DeployOptions | None = None,
    resume: bool = False,
    model_args: dict[str, Any] | None = None,
    cache: OriginalCache | None = None,
    sensitivity: str | Path | None = None,
) -> ConvertResult:
    """Convert a model with a recipe: transform, fine-tune, export to ONNX, validate in onnxruntime, report.

    A failed validation gate does not raise: the bundle is written and ``result.report.failed_gates`` lists it.
    Bad input raises a :class:`~vitcompress.errors.VitCompressError` before anything is written.

    Args:
        model: a model name (timm name, alias such as ``deit_s``, ``vit_fmnist``, or a Hugging Face checkpoint
            directory, docs/models.md; it wins over the recipe's ``model:``), None for the recipe's ``model:``, or an in-memory timm ``VisionTransformer`` (the
            teacher of the fine-tune; it is copied, never changed).
        recipe: a recipe file or a :class:`~vitcompress.recipe.Recipe`.
        data: ``'fmnist'``, ``'synthetic'``, an image directory, a torch Dataset of ``(image, label)`` or images
            (used for calibration, fine-tuning and validation), or a ``(train, val)`` pair of Datasets. Default:
            the reference model's Fashion-MNIST; other models need it (or ``random_init`` for noise).
        out_dir: where to write model.onnx, model.safetensors, recipe.resolved.yaml, report.json, report.md;
            None: a new temporary directory (``result.out_dir``; deleting it is the caller's business).
        checkpoint: weights file for a model name (.safetensors, .pth or .pt).
        overrides: ``key.path=value`` changes to the recipe (as the CLI's ``--set``), for a recipe file.
        force: replace an existing ``out_dir``: an empty directory, or an earlier bundle whose ``SHA256SUMS``
            lists every file in it (anything else is refused and left untouched).
        random_init: random weights for a model name (latency-only work; the report says so).
        labels: a YAML or JSON file mapping the image directory's class folders to the model's class indices or
            names, for folders named otherwise (see :mod:`vitcompress.labels`).
        progress: receives stage and progress events (default: ``logging``).
        deploy: offline-optimised files for the bundle (``model.opt.onnx``, ``model.ort``): see
            :func:`vitcompress.deploy.optimize.optimize_offline`; checked before anything runs.
        resume: continue an interrupted conversion into the same ``out_dir`` from its last fine-tune checkpoint
            (``finetune.checkpoint_every``); the resolved recipe, model, weights, data and process count must be
            those of the interrupted run.
        model_args: ``timm.create_model`` keyword arguments that change the architecture, e.g. ``{"depth": 2}``
            for a shallow copy (exports and parity in seconds); only with ``random_init`` (no weights fit it).
        cache: an :class:`~vitcompress.original_cache.OriginalCache` to share with other conversions of the same
            original (a loop over recipes): its ONNX export and predictions on built-in data are reused from it.
        sensitivity: a ``vitcompress sensitivity`` file, copied into the bundle for report.html's heat map.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process loads, transforms and fine-tunes (DDP); rank 0 alone
    exports, validates and writes; the others return a result whose ``report`` is None.

    Returns:
        A :class:`ConvertResult`: the converted module, the :class:`~vitcompress.report.Report`, the ONNX path
        and the output directory.

    Raises:
        ModelError: unknown name, or a module that is not a timm VisionTransformer.
        RecipeError, DataError, TargetError, OutputError, ExportError: bad input, described in one line.
    """
    if isinstance(recipe, Recipe) and overrides:
        raise RecipeError("overrides apply to a recipe file: change the Recipe object (model_copy) instead")
    recipe, recipe_source = recipe_argument(recipe, overrides)
    original, settings = _model_settings(model, recipe, checkpoint, random_init, model_args)
    label_mapping = read_label_mapping(Path(labels)) if labels is not None else None
    if sensitivity is not None:
        read_sensitivity(sensitivity)  # a bad file fails before any work
    if deploy is not None:
        check_options(deploy.optimize_offline, deploy.for_this_machine)
    bundle = None if data is None or isinstance(data, str) else in_memory_bundle(data, recipe.validate_.images)
    place = distributed.from_env(cuda=_trains_on_cuda(recipe))
    check_world_size(recipe, place.world_size)
    output = OutputTransaction(out_dir, force=force, resume=resume)
    if place.is_main:
        output.check()  # bad --out fails before any work; checked again under the output's lock
    settings = dataclasses.replace(settings, out_dir=output.out_dir, data=data if isinstance(data, str) else None,
                                   deploy=deploy or DeployOptions(),
                                   force=force, labels=label_mapping, resume=resume,
                                   sensitivity=Path(sensitivity) if sensitivity is not None else None)
    try:
        place = distributed.setup(cuda=_trains_on_cuda(recipe))
        return _run_stages(settings, recipe, recipe_source, original, bundle, progress or LogProgress(), place,
                           output, cache=cache or OriginalCache())
    except BaseException:
        output.discard()
        raise
    finally:
        distributed.teardown()


def preflight(model: str | None, recipe: str | Path, *, world_size: int, out_dir: str | Path,
              overrides: list[str] | None = None, force: bool = False, resume: bool = False,
              weights: str | Path | None = None, random_init: bool = False, data: str | None = None,
              model_args: dict[str, Any] | None = None) -> None:
    """The checks :func:`convert` makes before any work, for a launcher about to start ``world_size`` processes
    of it (``convert --nproc``): a bad recipe, a batch that does not divide, an unusable output directory or a
    resume of another run fail here, once, before any process starts."""
    loaded = load_recipe(recipe, overrides)
    _, settings = _model_settings(model, loaded, weights, random_init, model_args)
    check_world_size(loaded, world_size)
    check_out_dir(Path(out_dir), force)
    if resume:
        identity = checkpoint.run_identity(dump_recipe(loaded), settings.model, settings.checkpoint, random_init,
                                           data, world_size, settings.model_args)
        checkpoint.check_resumable(checkpoint.directory_for(Path(out_dir)), identity)


def remeasure_latency(bundle_dir: str | Path, model: str | None, recipe: str | Path, *,
                      overrides: list[str] | None = None, checkpoint: str | Path | None = None,
                      data: str | None = None, random_init: bool = False, model_args: dict[str, Any] | None = None,
                      labels: str | Path | None = None, reason: str = "latency re-measured",
                      progress: Progress | None = None) -> Report:
    """Time a finished bundle's ``model.onnx`` again on this machine against its original, re-created from the
    same model, weights and architecture arguments, and rewrite the bundle's latency fields (report.json,
    report.md, inference.json, SHA256SUMS); the converted model is not touched. See
    :mod:`vitcompress.remeasure`. The arguments are those of the :func:`convert` that made the bundle
    (the recipe's timing settings and ``validate.threads`` may differ: they are what is measured now).

    Raises:
        OutputError: ``bundle_dir`` is not a finished bundle; UsageError: a cascade bundle, or another model's.
    """
    bundle_dir = Path(bundle_dir)
    loaded = load_recipe(recipe, overrides)
    _, settings = _model_settings(model, loaded, checkpoint, random_init, model_args)
    settings = dataclasses.replace(settings, out_dir=bundle_dir, data=data,
                                   labels=read_label_mapping(Path(labels)) if labels is not None else None)
    scratch = Path(tempfile.mkdtemp(prefix="vitcompress-"))
    ctx = RunContext(settings=settings, recipe=loaded, work_dir=bundle_dir, scratch_dir=scratch,
                     progress=progress or LogProgress())
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        with output_lock(bundle_dir):
            if not is_bundle(bundle_dir):
                raise OutputError(f"{bundle_dir} is not a finished vitcompress bundle (report.json and model.onnx, "
                                  "every file listed in SHA256SUMS)")
            return remeasure.run(ctx, machine_description(), date, reason)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trains_on_cuda(recipe: Recipe) -> bool:
    """Whether the fine-tune will run on CUDA (then a torchrun job uses nccl, else gloo)."""
    return recipe.finetune is not None and recipe.finetune.device != "cpu" and torch.cuda.is_available()


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """``finetune.batch_size`` is the global batch: it must divide evenly among ``world_size`` processes."""
    if recipe.finetune is not None:
        distributed.check_global_batch(recipe.finetune.batch_size, world_size)


def _model_settings(model: str | nn.Module | None, recipe: Recipe, checkpoint: str | Path | None,
                    random_init: bool, model_args: dict[str, Any] | None = None,
                    ) -> tuple[LoadedModel | None, ConvertSettings]:
    """The in-memory original (None for a name, which the load stage loads) and the settings naming it."""
    if isinstance(model, nn.Module):
        if checkpoint is not None or random_init or model_args:
            raise ModelError("checkpoint, random_init and model_args go with a model name, not an in-memory module")
        original = _loaded_module(model)
        return original, ConvertSettings(model=original.name, out_dir=Path())
    if model is not None and not isinstance(model, str):
        raise ModelError(f"model: expected a name or a timm VisionTransformer module, got {type(model).__name__}")
    name = chosen_name(model, recipe.model)
    check_model_args(model_args, Path(checkpoint) if checkpoint else None, random_init)
    return None, ConvertSettings(model=name, out_dir=Path(), checkpoint=Path(checkpoint) if checkpoint else None,
                                 random_init=random_init, model_source="argument" if model else "recipe",
                                 model_args=dict(model_args or {}))


def _loaded_module(model: nn.Module) -> LoadedModel:
    """A frozen CPU copy of a user's timm ViT, with its preprocessing from timm's data config."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ModelError(f"convert() takes a timm VisionTransformer (the module the transforms know), got "
                         f"{type(model).__module__}.{type(model).__name__}: pass a timm ViT or a model name")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    return LoadedModel(model=copy.deepcopy(model).cpu().eval(), name=cfg.get("architecture") or type(model).__name__,
                       weights=IN_MEMORY_WEIGHTS, data_config=timm.data.resolve_data_config(model=model),
                       class_names=list(names) if names else None)


def _run_stages(settings: ConvertSettings, recipe: Recipe, recipe_source: str, original: LoadedModel | None,
                data: DataBundle | None, progress: Progress, place: distributed.Dist, output: OutputTransaction,
                cache: OriginalCache | None = None) -> ConvertResult:
    """Every stage, writing into ``output``'s work directory, which becomes ``output.out_dir`` when all have
    finished.

    In a torchrun job, ranks other than 0 run only the training stages, in a scratch directory, and write
    nothing; every rank checks after the transform and after the fine-tune that it holds rank 0's model."""
    out_dir = output.out_dir
    scratch_dir = Path(tempfile.mkdtemp(prefix="vitcompress-"))
    ctx = RunContext(settings=settings, recipe=recipe, work_dir=scratch_dir, scratch_dir=scratch_dir,
                     progress=progress, original=original, data=data, dist=place, checkpoint_dir=output.checkpoint_dir,
                     cache=cache or OriginalCache())
    try:
        if not place.is_main:
            ctx.progress = LogProgress()  # rank 0 shows the progress; the others log it (at INFO)
            _train(ctx)
            return ConvertResult(model=ctx.model, report=None, onnx_path=out_dir / "model.onnx", out_dir=out_dir)
        ctx.report.recipe = recipe_source
        ctx.report.date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        ctx.report.machine = machine_description()
        ctx.report.versions = {"torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                               "timm": _version("timm"), "onnx": _version("onnx")}
        identity = checkpoint.run_identity(dump_recipe(recipe), settings.model, settings.checkpoint,
                                           settings.random_init, settings.data, place.world_size, settings.model_args)
        checkpointing = recipe.finetune is not None and recipe.finetune.checkpoint_every is not None
        with output.writing(identity, checkpointing) as ctx.work_dir:
            (ctx.work_dir / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
            _train(ctx)
            if ctx.resolved_recipe is not None and ctx.resolved_recipe != recipe:
                (ctx.work_dir / "recipe.resolved.yaml").write_text(resolved_selectors_note(recipe)
                                                                  + dump_recipe(ctx.resolved_recipe))
            for stage in STAGES[len(TRAINING_STAGES):]:
                _run(ctx, stage)
            _record_timings(ctx)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return ConvertResult(model=ctx.model, report=Report.load(out_dir / "report.json"),
                         onnx_path=out_dir / "model.onnx", out_dir=out_dir)


def _train(ctx: RunContext) -> None:
    """The stages every rank runs: load, transform, fine-tune; in a torchrun job, each followed by the check
    that all ranks hold the same model (a rank that diverged would silently train something else)."""
    for stage in TRAINING_STAGES:
        _run(ctx, stage)
        if stage is not load:
            distributed.check_identical(ctx.model, ctx.dist, f"after the {stage.__name__.rpartition('.')[2]} stage")


def _run(ctx: RunContext, stage: Any) -> None:
    """One stage, timed (``ctx.clock``)."""
    with ctx.clock.stage(stage.__name__.rpartition(".")[2]):
        stage.run(ctx)


def _record_timings(ctx: RunContext) -> None:
    """Every stage's wall seconds into ``report.json`` and ``report.md``, then the checksums again.

    The report stage writes the report before the bundle (whose checksums cover it) and the page (a view of the
    checksummed files) run, so it can hold only the stages before it; this rewrites it with all of them once the
    last has finished. report.html shows no timings, so it stays the page of these files."""
    path = ctx.work_dir / "report.json"
    report = Report.load(path)
    report.timings = ctx.clock.timings()
    path.write_text(report.dump_json())
    (ctx.work_dir / "report.md").write_text(markdown(report))
    write_checksums(ctx.work_dir)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
