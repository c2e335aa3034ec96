"""Deploy forms and ONNX export: what the export stage, the planner, the skip search and users all call.

The exported file carries the preprocessing contract (mean, std, input size, interpolation, crop, class
names) in ``metadata_props`` (:func:`vitcompress.deploy.runtime.preprocessing_metadata`), so a deployment never
guesses it. A dynamic batch axis is verified by running two batch sizes in onnxruntime, not just declared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, open_session
from vitcompress.errors import ExportError
from vitcompress.export_config import ExportConfig
from vitcompress.layers.int8_linear import ONNX_TRANSLATIONS
from vitcompress.layers.lowrank_attention import AbsorbedAttention, HeadMajorAttention

CHECK_BATCHES = (1, 3)


def to_deploy(model: nn.Module, inplace: bool = False, head_major: bool = True) -> nn.Module:
    """``model`` with every module that has a train-time form replaced by its static deploy form
    (``to_deploy()``: no sparse branch, no router noise, int8 weights), in eval mode. A timm ``Attention``
    with a low-rank ``qkv`` becomes a :class:`~vitcompress.layers.lowrank_attention.HeadMajorAttention` (the
    same function without the per-block reshapes and transposes), or an
    :class:`~vitcompress.layers.lowrank_attention.AbsorbedAttention` when ``proj`` is low-rank too and both ranks
    are below the head dimension (fewer MACs again); README's fast section has their bench rows.

    Args:
        model: the model to convert.
        inplace: change ``model`` itself; by default a deep copy is converted and the caller's model is left
            as it was (as timm's ``reparameterize_model``).
        head_major: rewrite low-rank attention head-major (``export.head_major``); false keeps timm's layout.
    """
    model = model if inplace else copy.deepcopy(model)
    _unfuse_unexportable_attention(model)
    for convert in (_deploy_form, _head_major_form) if head_major else (_deploy_form,):
        for name, module in list(model.named_modules()):
            deployed = convert(module) if name else None
            if deployed is not None:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, deployed)
    return model.eval()


def _unfuse_unexportable_attention(model: nn.Module) -> None:
    """BEiT's attention with ``fused_attn`` (scaled_dot_product_attention) fails torch.export's decomposition with a
    dynamic batch (it views the transposed output, timm 1.0); its unfused path is the same function and exports."""
    for module in model.modules():
        if type(module).__module__ == "timm.models.beit" and getattr(module, "fused_attn", False):
            module.fused_attn = False


def _deploy_form(module: nn.Module) -> nn.Module | None:
    return module.to_deploy() if hasattr(module, "to_deploy") else None


def _head_major_form(module: nn.Module) -> nn.Module | None:
    for form in (AbsorbedAttention, HeadMajorAttention):
        if form.accepts(module):
            return form.from_attention(module)
    return None


def model_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of the model's images, from its timm pretrained config."""
    from timm.data import resolve_data_config

    return tuple(resolve_data_config(model=model)["input_size"])


def export_onnx(model: nn.Module, path: str | Path, *, input_size: Sequence[int] | None = None,
                config: ExportConfig | None = None, metadata: Mapping[str, str] | None = None,
                output_names: Sequence[str] = (LOGITS,)) -> Path:
    """Export the deploy form of ``model`` to ``path`` (one self-contained file) and check it in onnxruntime.

    ``model`` itself is not changed. The check runs the file at batch 1 and 3 (dynamic batch) or 2 (static):
    each output must have that batch and be finite.

    Args:
        model: a module taking a (N, *input_size) float tensor.
        path: the .onnx file to write.
        input_size: the shape of one input; by default the model's timm data config's ``input_size``.
        config: opset, dynamic batch and head-major attention (:class:`ExportConfig` defaults when None).
        metadata: ``metadata_props`` to store, e.g. :func:`vitcompress.deploy.runtime.preprocessing_metadata`.
        output_names: names of the model's outputs in order; the first must be the logits.
    """
    path = Path(path)
    config = config or ExportConfig()
    input_size = tuple(input_size or model_input_size(model))
    deployed = to_deploy(model, head_major=config.head_major)
    example = torch.randn(2, *input_size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if config.dynamic_batch else None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                deployed, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(output_names),
                dynamic_shapes=dynamic, opset_version=config.opset, external_data=False, verbose=False,
                custom_translation_table=ONNX_TRANSLATIONS,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    check_runs(path, input_size, CHECK_BATCHES if config.dynamic_batch else (2,))
    return path


def check_runs(path: Path, input_size: Sequence[int], batches: Sequence[int]) -> None:
    """Run the ONNX file in onnxruntime at each batch size: every output must have that batch and be finite."""
    session = open_session(path, threads=1)
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, *input_size), dtype=np.float32)
        try:
            outputs = session.run(None, {INPUT_NAME: x})
        except Exception as exc:
            raise ExportError(f"{path.name} does not run at batch {batch} in onnxruntime: {exc}") from None
        for got in outputs:
            if got.shape[0] != batch:
                raise ExportError(f"{path.name}: batch {batch} in, batch {got.shape[0]} out (batch axis baked in)")
            if not np.all(np.isfinite(got)):
                raise ExportError(f"{path.name}: onnxruntime output at batch {batch} is not finite")
