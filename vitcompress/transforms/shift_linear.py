"""``shift_linear``: replace Linear layers by power-of-two (shift) Linears, no router (ShiftAddViT's shift MLP).

Each target becomes a :class:`ShiftLinear` initialised with ``e = round(log2|W|)``, ``s = sign(W)``; the
exponents of each output channel keep ``levels`` consecutive values. With ``int8`` (``levels ≤ 7``) the
exported layer is exactly an int8 weight with a per-channel power-of-two scale and runs on onnxruntime's
int8 kernels (its activation is dynamically quantised to uint8, as ORT's dynamic quantisation does).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from vitcompress.layers.int8_levels import INT8_LEVELS
from vitcompress.transforms.registry import MLP_LINEARS, TransformConfig, TransformInputs, default_targets, register
from vitcompress.transforms.select import replace_module, select_linears

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class ShiftOptions(TransformConfig):
    """Settings of the power-of-two weights, shared with ``shiftadd_moe``."""

    targets: list[str] = default_targets(MLP_LINEARS, "both MLP Linears of every block")
    levels: int = Field(INT8_LEVELS, ge=1, le=32, description="exponents kept per output channel")
    int8: bool = Field(True, description="export as int8 × per-channel 2^e (needs levels ≤ 7)")

    @model_validator(mode="after")
    def _int8_levels(self) -> "ShiftOptions":
        if self.int8 and self.levels > INT8_LEVELS:
            raise ValueError(f"int8 export holds at most {INT8_LEVELS} levels per channel (±64 fits int8, "
                             f"±128 does not): set levels ≤ {INT8_LEVELS} or int8: false")
        return self


class ShiftConfig(ShiftOptions):
    transform: Literal["shift_linear"] = "shift_linear"


@register(ShiftConfig)
def apply_shift(model: nn.Module, config: ShiftConfig, inputs: TransformInputs) -> list[str]:
    """Replace each target Linear by a power-of-two (shift) Linear, W_pot = sign(W)·2^round(log2|W|) with
    `levels` exponents per output channel (ShiftAddViT / DeepShift-PS); exported as exact int8 when `int8`."""
    from vitcompress.layers.shift_linear import ShiftLinear

    step = "shift_linear"
    targets = select_linears(model, config.targets, config.ignore, step)
    for name, linear in targets:
        replace_module(model, name, ShiftLinear.from_linear(linear, config.levels, config.int8))
        log.info("%s: %s → shift (%d levels, int8 %s)", step, name, config.levels, config.int8)
    return [name for name, _ in targets]
