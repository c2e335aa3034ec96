"""``shiftadd_attention``: replace timm attention by ShiftAddViT's binary-code add attention (NeurIPS'23).

Each target ``Attention`` becomes a :class:`BinaryAttention` sharing its qkv/proj weights: L2-normalised q/k
binarised to {0,1} codes, ``out = (½·v + (1/π)·B_q(B_kᵀV)) / row sum``, linear in the token count and with
only additions in the code products. A large change to a pretrained model: fine-tune after it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from vitcompress.errors import TargetError
from vitcompress.transforms.registry import ATTENTIONS, TransformConfig, TransformInputs, default_targets, register
from vitcompress.transforms.select import replace_module, select_modules

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class BinaryAttentionConfig(TransformConfig):
    transform: Literal["shiftadd_attention"] = "shiftadd_attention"
    targets: list[str] = default_targets(ATTENTIONS, "every block's attention")


@register(BinaryAttentionConfig)
def apply_binary_attention(model: nn.Module, config: BinaryAttentionConfig, inputs: TransformInputs) -> list[str]:
    """Replace each target attention by ShiftAddViT's add-only attention over binary Q/K codes,
    out = (½·v + (1/π)·B_q(B_kᵀV)) / (½ + (1/π)·B_q(B_kᵀ1)), O(n) in the token count."""
    from timm.models.vision_transformer import Attention

    from vitcompress.layers.binary_attention import BinaryAttention

    step = "shiftadd_attention"
    targets = select_modules(model, config.targets, config.ignore, (Attention,), step)
    for name, attn in targets:
        if getattr(attn, "gate", None) is not None:
            raise TargetError(f"{step}: {name}: gated attention is not supported")
    for name, attn in targets:
        replace_module(model, name, BinaryAttention.from_attention(attn))
        log.info("%s: %s → binary-code add attention", step, name)
    return [name for name, _ in targets]
