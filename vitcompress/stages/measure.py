"""Model cost measurements shared by the stages: parameters and multiply–accumulates."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitcompress.layers.int8_linear import Int8PotLinear


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
