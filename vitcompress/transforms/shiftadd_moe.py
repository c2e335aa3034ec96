"""``shiftadd_moe``: Linear → token-routed mixture of {dense, shift} experts (ShiftAddViT, NeurIPS'23).

Each target becomes a :class:`MoELinear`: the original dense Linear and its power-of-two form, a per-token
``Linear(C, 2)`` router (top-1, trained through the probability-scaled output) and the latency-aware
load-balancing loss, which the fine-tune adds. ``latency_weights`` gives each expert's latency share α:
two numbers (normalised to sum 1), or ``measure``: time each distinct layer shape's two experts in
onnxruntime on this machine (:func:`vitcompress.measure.measure_latency_weights`: dense vs the shift expert's
deploy form, 1 thread, interleaved median).
``dispatch`` picks the static export form (see :mod:`vitcompress.layers.moe_linear`); ``auto`` lets the
export stage measure both and keep the faster.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Union

from pydantic import Field, field_validator

from vitcompress.transforms.registry import TransformInputs, register
from vitcompress.transforms.select import replace_module, select_linears
from vitcompress.transforms.shift_linear import ShiftOptions

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class MoEConfig(ShiftOptions):
    transform: Literal["shiftadd_moe"] = "shiftadd_moe"
    latency_weights: Union[Literal["measure"], list[float]] = Field(
        "measure", description="α of (dense, shift): 'measure' in onnxruntime here, or two positive numbers"
    )
    balance_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    noise_std: float = Field(0.5, gt=0, le=10, description="router logit noise in training (1/experts)")
    dispatch: Literal["auto", "where", "gather"] = Field(
        "auto", description="export: where = both experts on all tokens; gather = each on its own tokens; "
                            "auto = measure both in onnxruntime at export, keep the faster"
    )

    @field_validator("latency_weights")
    @classmethod
    def _two_positive(cls, weights):
        if weights != "measure" and (len(weights) != 2 or min(weights) <= 0):
            raise ValueError("give 'measure' or two positive numbers [dense, shift]")
        return weights


@register(MoEConfig)
def apply_moe(model: nn.Module, config: MoEConfig, inputs: TransformInputs) -> list[str]:
    """Replace each target Linear by a token-routed mixture of two experts from its weight, dense and
    power-of-two (ShiftAddViT): top-1 router trained through the probability-scaled output, latency-aware
    load-balancing loss CV²(Imp)+CV²(Load) with α = each expert's measured (or given) latency share."""
    from vitcompress.layers.moe_linear import MoELinear
    from vitcompress.measure import measure_latency_weights

    step = "shiftadd_moe"
    targets = select_linears(model, config.targets, config.ignore, step)
    measured: dict[tuple[int, int], tuple[float, float]] = {}
    for name, linear in targets:
        if config.latency_weights == "measure":
            shape = (linear.in_features, linear.out_features)
            if shape not in measured:
                measured[shape] = measure_latency_weights(*shape, config.int8)
                log.info("%s: %d→%d experts take %.3f / %.3f ms (dense / shift)", step, *shape,
                         *(t * 1e3 for t in measured[shape]))
            alpha = measured[shape]
        else:
            alpha = tuple(config.latency_weights)
        layer = MoELinear.from_linear(linear, config.levels, config.int8, alpha=alpha, noise_std=config.noise_std,
                                      balance_weight=config.balance_weight, dispatch=config.dispatch)
        replace_module(model, name, layer)
        log.info("%s: %s → MoE{dense, shift} α=(%.3f, %.3f), dispatch %s", step, name, *layer.alpha.tolist(),
                 config.dispatch)
    return [name for name, _ in targets]
