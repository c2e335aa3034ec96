"""``taylor_attention``: replace timm attention by ViTALiTy's linear Taylor attention (HPCA 2023).

Each target ``Attention`` becomes a :class:`TaylorAttention` that shares its qkv/proj weights and computes
``out_i = (v_sum + s·q_i G) / (n + s·q_i·k_sum)`` with ``G = K̂ᵀV``: O(n·d²) instead of O(n²·d), so it pays
most at high resolution (many tokens). ``center`` picks the key centring (``tokens``, the default: the mean
over keys, constant denominator; ``channels``: the paper's per-token row mean). ``sparse_branch`` turns on the
paper's training-only sparse regulariser during the fine-tune; it is removed before export.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from vitcompress.transforms.registry import ATTENTIONS, TransformConfig, TransformInputs, default_targets, register
from vitcompress.transforms.select import replace_module, select_modules

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class SparseBranchConfig(BaseModel):
    """The training-only sparse branch ``(1[P > τ] ⊙ P) V``, P = softmax of 4-bit fake-quantised logits."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="add the sparse branch while fine-tuning (never at inference)")
    threshold: float = Field(0.002, gt=0, lt=1, description="τ: attention probabilities ≤ τ are dropped")


class TaylorConfig(TransformConfig):
    transform: Literal["taylor_attention"] = "taylor_attention"
    targets: list[str] = default_targets(ATTENTIONS, "every block's attention")
    center: Literal["tokens", "channels"] = Field(
        "tokens", description="tokens: subtract the mean key (constant denominator, linearises the softmax); "
        "channels: subtract each key's mean over its channels (the paper's row-mean centring; ill-conditioned on "
        "pretrained models)"
    )
    sparse_branch: SparseBranchConfig = Field(default_factory=SparseBranchConfig)


@register(TaylorConfig)
def apply_taylor(model: nn.Module, config: TaylorConfig, inputs: TransformInputs) -> list[str]:
    """Replace each target attention by ViTALiTy's linear Taylor attention (HPCA'23),
    out_i = (1ᵀV + s·q_i K̂ᵀV) / (n + s·q_i·1ᵀK̂) with mean-centred keys, O(n) in the token count;
    `sparse_branch` adds the paper's training-only sparse regulariser during the fine-tune."""
    from timm.models.vision_transformer import Attention

    from vitcompress.layers.taylor_attention import TaylorAttention

    step = "taylor_attention"
    targets = select_modules(model, config.targets, config.ignore, (Attention,), step)
    threshold = config.sparse_branch.threshold if config.sparse_branch.enabled else None
    for name, attn in targets:
        replace_module(model, name, TaylorAttention.from_attention(attn, config.center, threshold))
        log.info("%s: %s → Taylor (center %s, sparse branch %s)", step, name, config.center,
                 f"τ={threshold}" if threshold is not None else "off")
    return [name for name, _ in targets]
