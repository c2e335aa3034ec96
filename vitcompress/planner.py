"""Dry run of a recipe before any training: what each step converts and saves, and whether the result exports.

:func:`plan` loads the model as ``convert`` does and applies the recipe's real transforms one step at a time,
in the order ``convert`` applies them (unstaged steps first, then each ``finetune.stages`` group). A step that
calibrates gets ``convert``'s calibration images, opened only then, but at most ``calibration_images`` of them
(:data:`PLAN_CALIBRATION_IMAGES` by default; calibration is most of a plan's time on large models), so ranks
by ``energy`` and CKA skip choices may differ from ``convert``'s on the full budget. After each step it counts
params and MACs of the model in its deploy form (``to_deploy()``), as ``convert``'s validation does, so the last
step's numbers are the converted model's. Then it exports the result with the export stage's code into a
temporary directory and runs it in onnxruntime at batch 1. No fine-tuning, no latency measurement, nothing
written: the predicted speed-up is a ratio of costs, not a measured latency. A float MAC costs 1; a MAC of an
int8 layer (shift weights, onnxruntime's MatMulInteger) costs what its kernel takes relative to the float
MatMul of the same shape, timed here in onnxruntime once per shape (1 thread, 400 tokens, interleaved median):
int8 kernels are 2–4× faster per MAC than float ones on x86 CPUs, so a plain MAC ratio (``mac_speedup``) would
call an int8 model no faster than the original. Binary-code attention runs float MatMuls over {0, 1} codes in
onnxruntime, so its MACs are counted as float MACs.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitcompress.context import ConvertSettings, RunContext
from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, open_session, preprocessing_metadata
from vitcompress.errors import ExportError
from vitcompress.export import export_onnx, to_deploy
from vitcompress.measure import count_macs, count_params, int8_macs, measure_latency_weights
from vitcompress.models import LoadedModel, check_model_args, chosen_name, load_model
from vitcompress.pipeline import apply_steps
from vitcompress.progress import LogProgress, Progress
from vitcompress.recipe import Recipe, recipe_argument, staged_steps

PLAN_CALIBRATION_IMAGES = 32
CASCADE_PLANNED = "cascade.low (the low-effort model; the high-effort one is not planned)"


class _PlanPart(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlannedModel(_PlanPart):
    name: str
    weights: str
    input_size: list[int]


class Cost(_PlanPart):
    """A model's size and cost per image: ``cost`` counts an int8 MAC at its measured cost in float MACs."""

    params: int
    macs: int
    cost: float


class FinalCost(Cost):
    speedup: float = Field(description="the original's cost / this one's")
    mac_speedup: float = Field(description="the original's MACs / this one's (int8 MACs counted as float)")


class PlanCalibration(_PlanPart):
    data: str
    images: int = Field(description="calibration images the plan used")
    recipe_images: int = Field(description="the recipe's calibration.images")


class StepSeconds(_PlanPart):
    apply: float
    measure: float


class PlannedStep(_PlanPart):
    """One recipe step: what it matched and the deployed params, MACs and cost before and after it."""

    step: int
    transform: str
    matched: int
    modules: list[str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    cost_before: float
    cost_after: float
    speedup: float
    cumulative_speedup: float
    mac_speedup: float
    seconds: StepSeconds
    details: Optional[dict[str, Any]] = None


class ExportCheck(_PlanPart):
    """Whether the planned model exports and runs in onnxruntime at batch 1 (``error`` says why not)."""

    exportable: bool
    error: Optional[str]
    opset: int
    dynamic_batch: bool
    onnx_bytes: Optional[int] = None
    output_shape: Optional[list[int]] = None
    max_abs_diff: Optional[float] = None


class Plan(_PlanPart):
    """What :func:`plan` found: per step what it converts and saves, the final predicted speed-up, the export."""

    model: PlannedModel
    recipe: str
    calibration: Optional[PlanCalibration]
    planned: str = Field(description="'steps', or which model of a cascade recipe was planned")
    original: Cost
    steps: list[PlannedStep]
    final: FinalCost
    export: ExportCheck
    seconds: dict[str, Optional[float]] = Field(description="load, measure, steps, export, check, total")


def step_order(recipe: Recipe) -> list[int]:
    """Indices of the recipe's model steps in the order ``convert`` applies them."""
    stages = staged_steps(recipe)
    later = [i for stage in stages for i in stage]
    return [i for i in range(len(recipe.model_steps)) if i not in later] + later


@functools.cache
def int8_mac_cost(in_features: int, out_features: int) -> float:
    """Cost of one int8 MAC of a layer of this shape in float MACs: onnxruntime's int8 time over its float
    MatMul time, measured on this machine (once per shape and process)."""
    dense, int8 = measure_latency_weights(in_features, out_features, int8=True)
    return int8 / dense


def deployed_cost(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, int, float]:
    """(params, MACs per image, cost per image in float MACs) of ``model`` in deploy form, measured on a copy:
    like ``convert``, the later steps transform the train-time form, and only the finished model is deployed."""
    deployed = to_deploy(model)
    macs = count_macs(deployed, input_size)
    int8 = int8_macs(deployed, input_size)
    cost = macs - sum(int8.values()) + sum(n * int8_mac_cost(*shape) for shape, n in int8.items())
    return count_params(deployed), macs, cost


def check_export(model: nn.Module, loaded: LoadedModel, recipe: Recipe, directory: Path) -> dict:
    """Export ``model`` with the export stage's code, then run it in onnxruntime on one image.

    A failure is the result, not an exception: ``exportable`` is False and ``error`` says why."""
    config = recipe.export
    input_size = tuple(loaded.data_config["input_size"])
    result: dict = {"exportable": False, "error": None, "opset": config.opset, "dynamic_batch": config.dynamic_batch}
    seconds = result["seconds"] = {"export": None, "check": None}
    t0 = time.perf_counter()
    try:
        try:
            path = export_onnx(model, directory / "model.onnx", input_size=input_size, config=config,
                               metadata=preprocessing_metadata(loaded.data_config, loaded.class_names))
        finally:
            seconds["export"] = time.perf_counter() - t0
        result["onnx_bytes"] = path.stat().st_size
        t0 = time.perf_counter()
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        got = open_session(path, threads=1).run([LOGITS], {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        seconds["check"] = time.perf_counter() - t0
        result["output_shape"] = list(got.shape)
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime output shape {got.shape}, torch {want.shape}")
        if not np.all(np.isfinite(got)):
            raise ExportError("onnxruntime output at batch 1 is not finite")
        result["max_abs_diff"] = float(np.abs(got - want).max())
        result["exportable"] = True
    except ExportError as exc:
        result["error"] = str(exc)
    except Exception as exc:  # any failure of the deploy form or of onnxruntime is the plan's finding
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def plan_steps(ctx: RunContext, input_size: tuple[int, ...], original: dict) -> list[dict]:
    """Apply ``ctx.recipe``'s steps to ``ctx.model`` in ``convert``'s order; per step what it matched and the
    deployed params and MACs before and after it."""
    params, macs, cost = original["params"], original["macs"], original["cost"]
    steps = []
    for i in step_order(ctx.recipe):
        t0 = time.perf_counter()
        applied = apply_steps(ctx, ctx.model, ctx.recipe.model_steps, [i])[0]
        t1 = time.perf_counter()
        params_after, macs_after, cost_after = deployed_cost(ctx.model, input_size)
        steps.append({"step": i, "transform": applied.transform, "matched": len(applied.modules),
                      "modules": applied.modules, "params_before": params, "params_after": params_after,
                      "macs_before": macs, "macs_after": macs_after, "cost_before": cost, "cost_after": cost_after,
                      "speedup": cost / cost_after, "cumulative_speedup": original["cost"] / cost_after,
                      "mac_speedup": macs / macs_after,
                      "seconds": {"apply": t1 - t0, "measure": time.perf_counter() - t1}})
        if applied.details:
            steps[-1]["details"] = applied.details
        params, macs, cost = params_after, macs_after, cost_after
    return steps


def plan(
    model: str | None,
    recipe: str | Path | Recipe,
    *,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    random_init: bool = False,
    model_args: dict[str, Any] | None = None,
    calibration_images: int | None = PLAN_CALIBRATION_IMAGES,
    progress: Progress | None = None,
) -> Plan:
    """Apply ``recipe`` to ``model`` step by step and check that the result exports; returns the :class:`Plan`.

    Arguments are ``convert``'s (``data`` is opened only when a step calibrates; ``model_args``, with
    ``random_init``, change the architecture as ``--model-arg`` does), plus ``calibration_images``:
    the most calibration images used (None: the recipe's ``calibration.images``). Bad input raises the
    same :class:`~vitcompress.errors.VitCompressError` as ``convert``; an export failure is reported in
    ``plan.export`` (``exportable`` False, ``error``).
    """
    t_start = time.perf_counter()
    recipe, recipe_source = recipe_argument(recipe, overrides)
    recipe_images = recipe.calibration.images
    if calibration_images is not None and calibration_images < recipe_images:
        budget = recipe.calibration.model_copy(update={"images": calibration_images})
        recipe = recipe.model_copy(update={"calibration": budget})
    name = chosen_name(model, recipe.model)
    check_model_args(model_args, Path(checkpoint) if checkpoint else None, random_init)
    progress = progress or LogProgress()
    progress.stage("load", name)
    loaded = load_model(name, Path(checkpoint) if checkpoint else None, random_init, model_args)
    loaded.model.requires_grad_(False)
    input_size = tuple(loaded.data_config["input_size"])
    seconds = {"load": time.perf_counter() - t_start}
    with tempfile.TemporaryDirectory(prefix="vitcompress-plan-") as tmp:
        settings = ConvertSettings(model=name, out_dir=Path(tmp), checkpoint=Path(checkpoint) if checkpoint else None,
                                   data=data, random_init=random_init, model_args=dict(model_args or {}))
        ctx = RunContext(settings=settings, recipe=recipe, work_dir=Path(tmp), scratch_dir=Path(tmp),
                         progress=progress, original=loaded, model=loaded.model)
        t0 = time.perf_counter()
        original = dict(zip(("params", "macs", "cost"), deployed_cost(loaded.model, input_size)))
        seconds["measure"] = time.perf_counter() - t0
        steps = plan_steps(ctx, input_size, original)
        seconds["steps"] = sum(s["seconds"]["apply"] + s["seconds"]["measure"] for s in steps)
        progress.stage("export", f"ONNX opset {recipe.export.opset} into a temporary directory, onnxruntime batch 1")
        export = check_export(loaded.model, loaded, recipe, Path(tmp))
    seconds.update(export.pop("seconds"), total=time.perf_counter() - t_start)
    final = ({"params": steps[-1]["params_after"], "macs": steps[-1]["macs_after"], "cost": steps[-1]["cost_after"]}
             if steps else dict(original))
    return Plan.model_validate({
        "model": {"name": loaded.name, "weights": loaded.weights, "input_size": list(input_size)},
        "recipe": recipe_source,
        "calibration": None if ctx.data is None else {
            "data": ctx.data.name, "images": min(recipe.calibration.images, len(ctx.data.train)),
            "recipe_images": recipe_images},
        "planned": "steps" if recipe.cascade is None else CASCADE_PLANNED,
        "original": original,
        "steps": steps,
        "final": {**final, "speedup": original["cost"] / final["cost"], "mac_speedup": original["macs"] / final["macs"]},
        "export": export,
        "seconds": seconds,
    })


def plan_rows(result: Plan) -> list[tuple[str, ...]]:
    """(step, params, MACs, speed-up, cumulative speed-up, seconds) per step, formatted for people."""
    return [(f"{s.step} {s.transform}", f"{s.params_before / 1e6:.2f} → {s.params_after / 1e6:.2f}",
             f"{_mega(s.macs_before)} → {_mega(s.macs_after)}", f"{s.speedup:.2f}×", f"{s.cumulative_speedup:.2f}×",
             f"{s.seconds.apply + s.seconds.measure:.1f}") for s in result.steps]


def _mega(value: int) -> str:
    """Millions with four significant digits or more: 277.1, 4599."""
    return f"{value / 1e6:.1f}" if value < 1e9 else f"{value / 1e6:.0f}"


def compact_names(names: list[str]) -> list[str]:
    """Module names with numbered siblings folded into one pattern: blocks.0.attn … blocks.10.attn →
    blocks.{0-10}.attn (the first numeric part of each name; runs of consecutive numbers become ranges)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for name in names:
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is None:
            groups.setdefault((name,), [])
            continue
        groups.setdefault((*parts[:at], "{}", *parts[at + 1:]), []).append(int(parts[at]))
    folded = []
    for pattern, numbers in groups.items():
        if len(numbers) <= 1:
            folded.append(".".join(pattern).replace("{}", str(numbers[0])) if numbers else pattern[0])
            continue
        runs: list[list[int]] = []
        for n in sorted(numbers):
            if runs and n == runs[-1][-1] + 1:
                runs[-1].append(n)
            else:
                runs.append([n])
        spans = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
        folded.append(".".join(pattern).replace("{}", "{" + spans + "}"))
    return folded


def export_line(export: ExportCheck) -> str:
    """One line: exportable or not, and why / what was checked."""
    if not export.exportable:
        return f"exportable: no ({export.error})"
    shape = tuple(export.output_shape)
    return (f"exportable: yes ({export.onnx_bytes / 1e6:.1f} MB ONNX; ORT batch 1 → {shape}, "
            f"|torch − ORT| ≤ {export.max_abs_diff:.1e})")
