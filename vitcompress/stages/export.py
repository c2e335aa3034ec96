"""Stage 4 — export: deploy form of every layer, ONNX via ``torch.onnx.export``, checked in onnxruntime.

The exported file carries the preprocessing contract (mean, std, input size, interpolation, crop, class
names) in ``metadata_props`` so a deployment never guesses it (the top cause of "accuracy dropped after
export" reports). A dynamic batch axis is verified by running two batch sizes, not just declared.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vitcompress.context import RunContext
from vitcompress.errors import ExportError
from vitcompress.layers.int8_linear import ONNX_TRANSLATIONS

INPUT_NAME, OUTPUT_NAME = "input", "logits"
CHECK_BATCHES = (1, 3)


def to_deploy(model: nn.Module) -> nn.Module:
    """Replace every module that has a train-time form by its static deploy form (``to_deploy()``)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "to_deploy"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_deploy())
    return model.eval()


def preprocessing_metadata(data_config: dict, class_names: list[str] | None) -> dict[str, str]:
    meta = {
        "vitcompress.input_size": json.dumps(list(data_config["input_size"])),
        "vitcompress.mean": json.dumps(list(data_config["mean"])),
        "vitcompress.std": json.dumps(list(data_config["std"])),
        "vitcompress.interpolation": str(data_config.get("interpolation", "bicubic")),
        "vitcompress.crop_pct": str(data_config.get("crop_pct", 1.0)),
    }
    if class_names:
        meta["vitcompress.class_names"] = json.dumps(class_names)
    return meta


def export_onnx(
    model: nn.Module, path: str | Path, input_size: tuple[int, ...], opset: int = 20, dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None, output_names: tuple[str, ...] = (OUTPUT_NAME,),
) -> Path:
    """Export ``model`` to ``path`` (one self-contained file), then check it loads and runs in onnxruntime.

    ``output_names`` names the model's outputs in order; the first must be the logits."""
    path = Path(path)
    model = to_deploy(model)
    example = torch.randn(2, *input_size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(output_names),
                dynamic_shapes=dynamic, opset_version=opset, external_data=False, verbose=False,
                custom_translation_table=ONNX_TRANSLATIONS,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    check_runs(path, input_size, CHECK_BATCHES if dynamic_batch else (2,))
    return path


def check_runs(path: Path, input_size: tuple[int, ...], batches: tuple[int, ...]) -> None:
    """Run the ONNX file in onnxruntime at each batch size: the output must have that batch and be finite."""
    from vitcompress.stages.validate import ort_session

    session = ort_session(path, threads=1)
    for batch in batches:
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch))
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        except Exception as exc:
            raise ExportError(f"{path.name} does not run at batch {batch} in onnxruntime: {exc}") from None
        if got.shape[0] != batch:
            raise ExportError(f"{path.name}: batch {batch} in, batch {got.shape[0]} out (batch axis baked in)")
        if not np.all(np.isfinite(got)):
            raise ExportError(f"{path.name}: onnxruntime output at batch {batch} is not finite")


def run(ctx: RunContext) -> None:
    from safetensors.torch import save_file

    from vitcompress.stages import moe_dispatch

    config = ctx.recipe.export
    input_size = tuple(ctx.original.data_config["input_size"])
    metadata = preprocessing_metadata(ctx.original.data_config, ctx.original.class_names)
    metadata["vitcompress.model"] = ctx.original.name
    ctx.progress.stage("export", f"ONNX opset {config.opset}, dynamic batch {config.dynamic_batch}")
    export_onnx(ctx.original.model, ctx.original_onnx_path, input_size, config.opset, config.dynamic_batch, metadata)
    dispatch = moe_dispatch.choose(ctx, lambda model, path: export_onnx(model, path, input_size, config.opset,
                                                                        config.dynamic_batch, metadata))
    if dispatch is None:
        export_onnx(ctx.model, ctx.onnx_path, input_size, config.opset, config.dynamic_batch, metadata)
    state = {k: v.contiguous() for k, v in ctx.model.state_dict().items()}
    save_file(state, str(ctx.work_dir / "model.safetensors"), metadata={"model": ctx.original.name})
    ctx.report["export"] = {"opset": config.opset, "dynamic_batch": config.dynamic_batch,
                            "checked_batches": list(CHECK_BATCHES if config.dynamic_batch else (2,)),
                            "onnx_bytes": ctx.onnx_path.stat().st_size}
    if dispatch is not None:
        ctx.report["export"]["moe_dispatch"] = dispatch
