"""Stage 5b — ladder: where accuracy went, and what report.html needs kept in the bundle.

Each model of the run on the same first ``validate.ladder_images`` validation images (the held-out part of one
image directory), timed: the original and the fine-tuned model in torch, the float32 ONNX and, when the recipe
quantizes, the int8 ONNX in onnxruntime (the transformed model was measured by the transform stage, before
fine-tuning, and the original by the validation, whose torch parity reads the first images of the same pass);
a rung the recipe has no model for is reported as skipped, with the reason. Then the end-to-end
latency per image from its file (the bundle's own preprocessing), ``predictions.npz`` and the thumbnails of the
first disagreements (:mod:`vitcompress.ladder`), and ``sensitivity.json`` when ``convert --sensitivity`` gave one.
"""

from __future__ import annotations

from pathlib import Path

from vitcompress.context import RunContext
from vitcompress.data import ImageDirectory
from vitcompress.evaluate import TOP_K, end_to_end
from vitcompress.ladder import (
    PREDICTIONS,
    RUNGS,
    RungPass,
    disagreements,
    input_images,
    onnx_pass,
    rung,
    torch_pass,
    write_predictions,
    write_thumbnails,
)
from vitcompress.report import EndToEnd, Explain, Ladder
from vitcompress.sensitivity_file import SENSITIVITY, read_sensitivity

#: Images (their files, or PNGs of the inputs) the end-to-end latency is measured on.
END_TO_END_IMAGES = 8


def passes(ctx: RunContext, images: int) -> dict[str, RungPass | str]:
    """Each rung's pass over the first ``images`` validation images, or why the run has no such model."""
    data, threads, quantize = ctx.data.val, ctx.recipe.validate_.threads, ctx.recipe.export.quantize
    fp32 = ctx.onnx_path if quantize == "none" else ctx.scratch_dir / f"{ctx.onnx_path.stem}.fp32.onnx"
    return {
        "original": ctx.rungs.get("original") or torch_pass(ctx.original.model, data, images),
        "transformed": ctx.rungs.get("transformed", "finetune.stages applies the recipe's steps between training "
                                                    "stages: no model holds them all before fine-tuning"),
        "finetuned": torch_pass(ctx.model, data, images) if ctx.recipe.finetune else "the recipe has no finetune",
        "onnx_fp32": onnx_pass(fp32, data, images, threads) if fp32.is_file() else
        "the float32 export of the chosen MoE form was not kept",
        "quantized": onnx_pass(ctx.onnx_path, data, images, threads) if quantize != "none" else
        "the recipe does not quantize (export.quantize: none)",
    }


def end_to_end_files(ctx: RunContext) -> list[Path]:
    """The first validation images' files, or PNGs of the images as the model saw them (built-in data sets)."""
    data = ctx.data.val
    count = min(END_TO_END_IMAGES, len(data))
    if isinstance(data, ImageDirectory):
        return [Path(path) for path, _ in data.items[:count]]
    files = []
    for i, png in enumerate(input_images(data, list(range(count)), ctx.original.data_config)):
        files.append(ctx.scratch_dir / f"end-to-end-{i}.png")
        files[-1].write_bytes(png)
    return files


def run(ctx: RunContext) -> None:
    config = ctx.recipe.validate_
    images = min(config.ladder_images, len(ctx.data.val))
    ladder = None
    if images:
        ctx.progress.stage("ladder", f"{len(RUNGS)} rungs (torch and onnxruntime) on {images} validation images")
        with ctx.clock.part("rungs"):
            measured = passes(ctx, images)
        original = measured["original"]
        ladder = Ladder(images=images, rungs=[rung(name, measured[name], original) for name in RUNGS])
        kept = {name: result for name, result in measured.items() if isinstance(result, RungPass)}
    else:
        kept = {}
    ctx.progress.stage("end-to-end", "decode, resize, normalise and model.onnx per image, batch 1")
    with ctx.clock.part("end-to-end"):
        timing = end_to_end(ctx.onnx_path, end_to_end_files(ctx), config.threads)
    write_predictions(ctx.work_dir / PREDICTIONS, ctx.predictions, kept)
    differ = disagreements(ctx.predictions)
    sensitivity = None
    if ctx.settings.sensitivity is not None:
        sensitivity = SENSITIVITY
        (ctx.work_dir / SENSITIVITY).write_text(read_sensitivity(ctx.settings.sensitivity).model_dump_json(indent=2))
    ctx.report.explain = Explain(
        ladder=ladder, end_to_end=EndToEnd.model_validate(timing), predictions=PREDICTIONS, top_k=TOP_K,
        disagreements=len(differ), sensitivity=sensitivity,
        shown=write_thumbnails(ctx.work_dir, ctx.data.val, differ, ctx.original.data_config))
