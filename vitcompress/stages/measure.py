"""Model cost measurements shared by the stages: parameters and multiply–accumulates."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
