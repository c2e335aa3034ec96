"""Stage 4 — export: the original and the converted model to ONNX (:mod:`vitcompress.export`), checked in
onnxruntime, with the preprocessing contract in their metadata; the converted weights as safetensors.

With ``export.quantize`` the converted model is exported in float32 to the scratch directory and its int8 form
(:mod:`vitcompress.quantize`, static ranges from the recipe's calibration images) becomes ``model.onnx``: the
bundle ships, validates and verifies the int8 model; the original stays float32, the baseline it is compared to.

The original's ONNX goes to the scratch directory: validation times it side by side with the converted one.
The converted model is put in its deploy form first (in place): validation compares onnxruntime with exactly
the torch model that was exported, and model.safetensors holds the deployed weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vitcompress import moe_dispatch
from vitcompress.context import RunContext
from vitcompress.export import CHECK_BATCHES, check_runs, to_deploy
from vitcompress.pipeline import calibration_batches, export_model, export_original
from vitcompress.quantize import quantize_onnx
from vitcompress.report import Export, MoEDispatch, Quantization


def export_quantized(ctx: RunContext, model: nn.Module, path: Path) -> dict:
    """``model`` to float32 ONNX in the scratch directory, then its int8 form (``export.quantize``) at ``path``,
    checked in onnxruntime like every export; returns what :func:`~vitcompress.quantize.quantize_onnx` did."""
    config = ctx.recipe.export
    fp32 = export_model(ctx, model, ctx.scratch_dir / f"{path.stem}.fp32.onnx")
    images = min(ctx.recipe.calibration.images, len(ctx.data.train)) if config.quantize == "static" else 0
    ctx.progress.stage("quantize", f"{config.quantize} int8 (onnxruntime.quantization), per-channel "
                                   f"{config.per_channel}" + (f", {config.calibration_method} ranges from {images} "
                                                              "calibration images" if images else ""))
    batches = (b.numpy() for b in calibration_batches(ctx)) if config.quantize == "static" else ()
    done = quantize_onnx(fp32, path, config.quantize, calibration=batches, method=config.calibration_method,
                         per_channel=config.per_channel)
    check_runs(path, tuple(ctx.original.data_config["input_size"]),
               CHECK_BATCHES if config.dynamic_batch else (2,))
    return done


def run(ctx: RunContext) -> None:
    from safetensors.torch import save_file

    config = ctx.recipe.export
    quantized: dict = {}

    def export(model: nn.Module, path: Path) -> Path:
        if config.quantize == "none":
            return export_model(ctx, model, path)
        quantized.update(export_quantized(ctx, model, path))
        return path

    ctx.progress.stage("export", f"ONNX opset {config.opset}, dynamic batch {config.dynamic_batch}"
                                 + (f", then {config.quantize} int8" if config.quantize != "none" else ""))
    with ctx.clock.part("original"):
        export_original(ctx)
    with ctx.clock.part("converted"):
        ctx.model = to_deploy(ctx.model, inplace=True, head_major=config.head_major)
        dispatch = moe_dispatch.choose(ctx, export)
        if dispatch is None:
            export(ctx.model, ctx.onnx_path)
    with ctx.clock.part("weights"):
        state = {k: v.contiguous() for k, v in ctx.model.state_dict().items()}
        save_file(state, str(ctx.work_dir / "model.safetensors"), metadata={"model": ctx.original.name})
    ctx.report.export = Export(
        opset=config.opset, dynamic_batch=config.dynamic_batch,
        checked_batches=list(CHECK_BATCHES if config.dynamic_batch else (2,)), onnx_bytes=ctx.onnx_path.stat().st_size,
        moe_dispatch=MoEDispatch.model_validate(dispatch) if dispatch is not None else None,
        quantize=Quantization.model_validate(quantized) if quantized else None)
