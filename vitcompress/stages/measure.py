"""Model cost measurements shared by the stages: parameters and multiply–accumulates."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """MACs of one image through ``model`` (FLOPs/2 from torch's FlopCounterMode: matmuls, convs, attention)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() // 2
