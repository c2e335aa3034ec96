"""int8 quantisation of an exported ONNX file with onnxruntime's own tools (``export.quantize`` of a recipe).

- ``dynamic``: :func:`onnxruntime.quantization.quantize_dynamic`: int8 weights, activations quantised per tensor
  at run time (``DynamicQuantizeLinear``), so a result depends slightly on the other images of its batch.
- ``static``: :func:`~onnxruntime.quantization.quant_pre_process` (shape inference and graph clean-up), then
  :func:`~onnxruntime.quantization.quantize_static` in QDQ form: int8 weights (per output channel by default)
  and activation scales fixed from calibration images, so no ``DynamicQuantizeLinear`` is left for the layers
  it quantises and an image's logits do not depend on its batch. Only layers with a stored 2-D weight are
  quantised: the attention products of two activations (see :func:`weight_nodes`) and the per-head (3-D) weights
  of a head-major attention (see :func:`batched_weight_nodes`) stay float32, which is faster. A low-rank pair
  (two MatMuls or Gemms) gets one QuantizeLinear→DequantizeLinear chain on the rank-r intermediate, the second's
  input. The MatMul and Gemm outputs are not quantised (``OpTypesToExcludeOutputQuantization``): onnxruntime
  fuses each into a QGemm / MatMulIntegerToFloat with a float32 output, so the float ops after a layer (GELU,
  the residual Add, attention) read it without a DequantizeLinear of their own, and only a layer's input is
  quantised (see :data:`UNQUANTISED_OUTPUTS`).

Only float MatMul, Gemm and Conv nodes are quantised: the ``MatMulInteger`` layers a recipe already made int8
(:mod:`vitcompress.layers.int8_linear`) and their ``DynamicQuantizeLinear`` are left as they are. The metadata
(the preprocessing contract) is copied over. Imports numpy, onnx and onnxruntime only (no torch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from vitcompress.deploy.runtime import INPUT_NAME
from vitcompress.errors import ExportError

QuantizeMode = Literal["none", "dynamic", "static"]
Calibration = Literal["minmax", "entropy", "percentile"]
ActivationType = Literal["uint8", "int8"]
#: The float ops that get int8 weights; everything else (norms, softmax, MatMulInteger) stays as it is.
OP_TYPES = ("MatMul", "Gemm", "Conv")
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
#: The op types whose outputs ``static`` leaves in float32. Quantising them added a QuantizeLinear after each
#: layer and a DequantizeLinear before each float consumer (GELU, the residual Add, the three attention products
#: of a head-major qkv): DeiT-S + the fast recipe, 2 threads, 20 interleaved runs, AMD EPYC, 2026-12-05
#: (bench/quant_study.py): batch-1 p50 15.2 → 13.9 ms, batch-8 108 → 84 ms without them. Conv keeps its
#: quantised output: without it onnxruntime does not fuse the patch embedding into a QLinearConv.
UNQUANTISED_OUTPUTS = ("MatMul", "Gemm")
#: Images per calibration run. onnxruntime's calibration session outputs every activation it reduces, so a run
#: holds all of them at once: DeiT-S took 14 GB at 64 images (24 GB and an OOM kill at 128). The ranges are a
#: min/max over all images (or a histogram of them), so running them a few at a time gives the same minmax ranges.
CALIBRATION_CHUNK = 8


class BatchReader(CalibrationDataReader):
    """onnxruntime's calibration reader over float32 image batches (N, C, H, W), fed as the model's input
    ``chunk`` images at a time (see :data:`CALIBRATION_CHUNK`)."""

    def __init__(self, batches: Iterable[np.ndarray], chunk: int | None = None) -> None:
        chunk = chunk or CALIBRATION_CHUNK
        self._chunks: Iterator[np.ndarray] = (batch[i:i + chunk] for batch in batches
                                              for i in range(0, len(batch), chunk))
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        self.images += len(chunk)
        return {INPUT_NAME: np.ascontiguousarray(chunk, dtype=np.float32)}


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's nodes of :data:`OP_TYPES` (what the quantiser will touch)."""
    return [n.name for n in model.graph.node if n.op_type in OP_TYPES]


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the :data:`OP_TYPES` nodes whose second input is a stored weight: the layers, not the attention
    products of two activations (measured once on DeiT-S + fast steps, 2 threads, 2026-12-03: quantising those
    too took the static model's batch-8 p50 from 294 to 336 ms, batch 1 from 29.1 to 33.0 ms)."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in OP_TYPES and n.input[1] in weights]


def batched_weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose stored weight has more than two axes (one matrix per attention head, as
    the head-major forms of :mod:`vitcompress.layers.lowrank_attention` export). onnxruntime's per-channel
    dynamic quantiser gives such a weight a zero point that ``MatMulIntegerToFloat`` rejects at run time ("b zero
    point is not valid", onnxruntime 1.32), so per-channel ``dynamic`` leaves them in float32. ``static`` always
    does: onnxruntime fuses a QDQ MatMul into ``QLinearMatMul`` only for a 2-D weight, and the unfused Quantize /
    Dequantize pairs cost time (DeiT-S + fast when its absorbed attention still had per-head weights, 2 threads:
    batch-1 p50 17.1 → 16.4 ms, batch-8 99 → 95 ms with them left float32; measured 2026-12-04, AMD EPYC).
    :class:`~vitcompress.layers.lowrank_attention.AbsorbedAttention` has no such weights: its heads' matrices
    are side by side in 2-D layers, quantised as any other."""
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1], 0) > 2]


def _static_nodes(model: onnx.ModelProto) -> list[str]:
    """The layers ``static`` quantises: :func:`weight_nodes` without :func:`batched_weight_nodes`."""
    batched = set(batched_weight_nodes(model))
    return [name for name in weight_nodes(model) if name not in batched]


def quantize_onnx(source: Path, target: Path, mode: Literal["dynamic", "static"], *,
                  calibration: Iterable[np.ndarray] = (), method: Calibration = "minmax",
                  per_channel: bool = True, activations: ActivationType = "uint8",
                  quantised_outputs: bool = False) -> dict:
    """Write the int8 form of the ONNX file ``source`` to ``target``; return what was done (for the report).

    Args:
        source: a float32 model with one image input (:data:`~vitcompress.deploy.runtime.INPUT_NAME`).
        target: the int8 ONNX file to write (``source`` is left as it is).
        mode: ``dynamic`` or ``static`` (see the module docstring).
        calibration: float32 batches preprocessed as for validation (``static`` only).
        method: how ``static`` turns the calibration activations into ranges.
        per_channel: one weight scale per output channel (else per tensor).
        activations: the activations' int8 type of ``static`` (weights are always signed int8).
        quantised_outputs: ``static`` also quantises the MatMul and Gemm outputs (onnxruntime's default, for a
            runtime that wants every tensor in QDQ form; slower in onnxruntime's CPU provider, see
            :data:`UNQUANTISED_OUTPUTS`).
    """
    source, target = Path(source), Path(target)
    model = onnx.load(str(source))
    nodes = float_nodes(model)
    if not nodes:
        raise ExportError(f"export.quantize: {mode}: {source.name} has no float MatMul/Gemm/Conv to quantise")
    done = {"mode": mode, "per_channel": per_channel, "nodes": len(nodes), "fp32_onnx_bytes": source.stat().st_size}
    with quiet_root_logger():
        if mode == "dynamic":
            quantize_dynamic(str(source), str(target), op_types_to_quantize=list(OP_TYPES), per_channel=per_channel,
                             weight_type=QuantType.QInt8,
                             nodes_to_exclude=batched_weight_nodes(model) if per_channel else None)
        else:
            batches = iter(calibration)
            first = next(batches, None)
            if first is None:
                raise ExportError("export.quantize: static needs calibration images, none were given")
            reader = BatchReader(itertools.chain([first], batches))
            with tempfile.TemporaryDirectory() as scratch:
                prepared = Path(scratch) / "prepared.onnx"
                prepare_for_static(source, prepared)
                quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(OP_TYPES),
                                nodes_to_quantize=_static_nodes(onnx.load(str(prepared))), per_channel=per_channel,
                                activation_type=ACTIVATIONS[activations], weight_type=QuantType.QInt8,
                                calibrate_method=METHODS[method], calibration_providers=["CPUExecutionProvider"],
                                extra_options={} if quantised_outputs else
                                {"OpTypesToExcludeOutputQuantization": list(UNQUANTISED_OUTPUTS)})
            done.update(calibration=method, activations=activations, calibration_images=reader.images,
                        quantised_outputs=quantised_outputs)
    copy_metadata(model, target)
    return done


def prepare_for_static(source: Path, prepared: Path) -> None:
    """onnxruntime's ``quant_pre_process`` (optimisation and shape inference) of ``source`` into ``prepared``.

    Its symbolic shape inference cannot follow every graph: token merging's data-dependent ``Expand`` makes it
    raise ``TypeError`` (measured on a ToMe export, onnxruntime 1.32). Such a graph is prepared with ONNX's own
    shape inference only (``skip_symbolic_shape``), which the static quantiser needs no more than."""
    try:
        quant_pre_process(str(source), str(prepared), skip_optimization=False)
    except (TypeError, KeyError, AssertionError):
        quant_pre_process(str(source), str(prepared), skip_optimization=False, skip_symbolic_shape=True)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantiser logs pre-processing hints on the root logger: raise it to ERROR while it runs,
    then restore it (a library must not change the caller's logging for good)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def copy_metadata(source: onnx.ModelProto, target: Path) -> None:
    """Put ``source``'s ``metadata_props`` (the preprocessing contract) on the ONNX file ``target``."""
    quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    onnx.save_model(quantized, str(target))
