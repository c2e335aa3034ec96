"""Model cost measurement: parameters, multiply–accumulates, and the onnxruntime cost of single layers.

A library that the stages, the planner, the transforms (the MoE's measured latency shares) and ``bench/`` use.
:func:`machine_description` names the machine that every reported latency was measured on.
The kernel-cost graphs are exported from the layers themselves (:func:`vitcompress.export.export_onnx`), so the
node sequence that is timed is the one a converted model runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitcompress.deploy.optimize import cpu_name
from vitcompress.deploy.runtime import INPUT_NAME, open_session, time_interleaved
from vitcompress.deploy.timing_lock import latency_lock
from vitcompress.export import export_onnx
from vitcompress.export_config import ExportConfig
from vitcompress.layers.int8_levels import INT8_LEVELS
from vitcompress.layers.int8_linear import Int8PotLinear

#: tokens per timed call of one layer: about 8 images of 50 tokens; the share is what matters, not the time
MEASURE_TOKENS = 400
MEASURE_RUNS = 30


def machine_description() -> str:
    """CPU model and core count, for every reported latency."""
    return f"{cpu_name()}, {torch.get_num_threads()} threads available"


def count_params(model: nn.Module) -> int:
    """Weights the model holds: its parameters plus the int8 weights and biases of deploy-form
    :class:`Int8PotLinear` layers, which are buffers (a frozen int8 layer is still a layer of weights)."""
    frozen = sum(m.w_int.numel() + m.bias.numel() for m in model.modules() if isinstance(m, Int8PotLinear))
    return sum(p.numel() for p in model.parameters()) + frozen


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """MACs of one image through ``model`` (FLOPs/2 from torch's FlopCounterMode: matmuls, convs).

    timm's fused attention calls the CPU SDPA kernel, which FlopCounterMode does not count, so the two n²
    attention matmuls would vanish from the original model's cost; counting runs with ``fused_attn`` off
    (the explicit QKᵀ and AV matmuls, same result) and restores it afterwards.
    """
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    counter = FlopCounterMode(display=False)
    try:
        for module in fused:
            module.fused_attn = False
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_size))
    finally:
        for module, value in fused.items():
            module.fused_attn = value
    return counter.get_total_flops() // 2


def int8_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[tuple[int, int], int]:
    """MACs of one image through each shape (in, out) of the model's int8 layers (:class:`Int8PotLinear`);
    empty when it has none. They are part of :func:`count_macs`'s total, at a different cost per MAC."""
    counts: dict[tuple[int, int], int] = {}

    def count(module: Int8PotLinear, args: tuple) -> None:
        shape = (module.in_features, module.out_features)
        tokens = args[0].numel() // module.in_features
        counts[shape] = counts.get(shape, 0) + tokens * module.in_features * module.out_features

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, Int8PotLinear)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def expert_layer(in_features: int, out_features: int, int8: bool, seed: int) -> nn.Module:
    """A layer of one shape with seeded random weights: a float ``nn.Linear``, or the :class:`Int8PotLinear` that a
    shift expert deploys to (int8 weights within ±2^(levels−1), a power-of-two scale per output channel)."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(out_features, generator=generator)
    if not int8:
        layer = nn.Linear(in_features, out_features)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
            layer.bias.copy_(bias)
        return layer
    bound = 2 ** (INT8_LEVELS - 1)
    w_int = torch.randint(-bound, bound + 1, (out_features, in_features), generator=generator, dtype=torch.int8)
    return Int8PotLinear(w_int, torch.full((out_features,), 2.0**-10), bias)


def measure_latency_weights(in_features: int, out_features: int, int8: bool) -> tuple[float, float]:
    """Median onnxruntime time in seconds (1 thread, interleaved runs of :data:`MEASURE_TOKENS` tokens) of the
    dense and the shift expert of one shape, each exported from its layer (:func:`expert_layer`)."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for seed, (name, quantised) in enumerate((("dense", False), ("shift", int8))):
            path = export_onnx(expert_layer(in_features, out_features, quantised, seed), Path(tmp) / f"{name}.onnx",
                               input_size=(in_features,), config=ExportConfig())
            sessions[name] = open_session(path, threads=1)
        x = np.random.default_rng(0).standard_normal((MEASURE_TOKENS, in_features)).astype(np.float32)
        with latency_lock(f"expert kernels {in_features}→{out_features}"):
            timing = time_interleaved(sessions, dict.fromkeys(sessions, {INPUT_NAME: x}), runs=MEASURE_RUNS,
                                      warmup=3)
    return timing["dense"].p50_ms / 1e3, timing["shift"].p50_ms / 1e3
