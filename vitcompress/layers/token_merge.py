"""Token merging (ToMe): each block merges its ``r`` most redundant token pairs, so later blocks see fewer tokens.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023. Training-free: no weight changes. In each
merging block, between the attention and the MLP branch:

1. *Similarity metric*: the attention's keys averaged over heads, one vector per token (the keys already
   summarise what a token contains, and are computed anyway).
2. *Bipartite soft matching*: tokens alternate into set A (even positions) and B (odd positions); every A token
   finds its most cosine-similar B token; the ``r`` A tokens with the highest best-similarity are merged into
   their B match. The class token (position 0, in A) gets similarity −∞ and is never merged.
3. *Size-weighted merge*: every token carries a size s (how many patches it stands for, 1 at the start); a
   merged B token becomes Σ s·x / Σ s over itself and the A tokens merged into it (``scatter_add``).
4. *Proportional attention*: later attentions add log s_j to the logits of key j, so a token that stands for
   s patches weighs as much as the s tokens it replaced.

Output order: the unmerged A tokens in their original order, then all B tokens in theirs; the class token stays
at position 0, where timm's ``global_pool='token'`` head reads it. Every index is computed with ``max``,
``argsort``/``sort``, ``gather`` and ``scatter_add`` over shapes that only depend on the token count, so
``torch.onnx.export(dynamo=True)`` gives a plain graph (TopK, GatherElements, ScatterElements) with a dynamic
batch axis and no custom op.

``r`` larger than possible is clamped: a block with ``n`` tokens merges at most ``(n − 1) // 2`` of them (every
A token but the class token; B tokens are never removed), so ``r`` can be given once for the whole model.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

Size = Optional[torch.Tensor]
"""Token sizes (B, N, 1) in the dtype of the tokens; None while every token still stands for one patch."""


class MergePlan(NamedTuple):
    """Indices of one bipartite soft matching, each (B, k): A tokens kept (ascending), A tokens merged away
    (``src``) and the B token each of them goes into (``dst``)."""

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def max_merge(tokens: int) -> int:
    """How many tokens one step can merge away: every A token (even position) but the class token."""
    return (tokens - 1) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> MergePlan:
    """ToMe's matching on ``metric`` (B, N, d): the ``r`` A tokens (even positions, class token excluded) with the
    highest cosine similarity to their best B token (odd positions). ``r`` must be ≤ ``max_merge(N)``."""
    metric = F.normalize(metric, dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-2, -1)
    scores = torch.cat([torch.full_like(scores[:, :1], -torch.inf), scores[:, 1:]], dim=1)
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return MergePlan(unmerged=order[:, r:].sort(dim=-1).values, src=src, dst=best_b.gather(1, src))


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, k) of ``x`` (B, N, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _merge_sum(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Unmerged A rows, then B rows with the merged A rows added into their destinations."""
    a, b = x[:, ::2], x[:, 1::2]
    dst = plan.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.cat([_rows(a, plan.unmerged), b.scatter_add(1, dst, _rows(a, plan.src))], dim=1)


def merge_weighted(x: torch.Tensor, size: Size, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``plan`` to tokens ``x`` (B, N, C): every output token is the size-weighted mean Σ s·x / Σ s of the
    tokens merged into it; returns the tokens and their new sizes (B, N − r, 1)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged_size = _merge_sum(size, plan)
    return _merge_sum(x * size, plan) / merged_size, merged_size


class ToMeAttention(nn.Module):
    """timm ``Attention`` with proportional attention (logits + log size of each key), also returning the merge
    metric (keys averaged over heads). Shares the attention's modules, so its state-dict keys stay the same."""

    def __init__(self, num_heads: int, head_dim: int, qkv: nn.Linear, proj: nn.Module,
                 q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, attn_drop: Optional[nn.Dropout] = None,
                 proj_drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.qkv, self.proj = qkv, proj
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_drop = attn_drop if attn_drop is not None else nn.Dropout(0.0)
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "ToMeAttention":
        """Build from a timm ``Attention``, sharing (not copying) its modules and so its weights."""
        if getattr(attn, "gate", None) is not None:
            raise TypeError("gated attention is not supported")
        return cls(attn.num_heads, attn.head_dim, attn.qkv, attn.proj, q_norm=attn.q_norm, k_norm=attn.k_norm,
                   norm=getattr(attn, "norm", None), attn_drop=attn.attn_drop, proj_drop=attn.proj_drop)

    def forward(self, x: torch.Tensor, size: Size = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        return self.proj_drop(self.proj(out)), k.mean(dim=1)


class ToMeBlock(nn.Module):
    """A timm pre-norm ``Block`` that merges ``r`` tokens between its attention and its MLP branch.

    ``forward(x, size) -> (x, size)``: it needs and returns the token sizes, so it runs inside
    :class:`ToMeBlocks`. With ``r = 0`` it only adds proportional attention; with ``r = 0`` and all sizes 1
    (``size=None``) it is the original block.
    """

    def __init__(self, norm1: nn.Module, attn: ToMeAttention, norm2: nn.Module, mlp: nn.Module, r: int,
                 ls1: Optional[nn.Module] = None, drop_path1: Optional[nn.Module] = None,
                 ls2: Optional[nn.Module] = None, drop_path2: Optional[nn.Module] = None) -> None:
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be ≥ 0, got {r}")
        self.r = r
        self.norm1, self.attn = norm1, attn
        self.ls1 = ls1 if ls1 is not None else nn.Identity()
        self.drop_path1 = drop_path1 if drop_path1 is not None else nn.Identity()
        self.norm2, self.mlp = norm2, mlp
        self.ls2 = ls2 if ls2 is not None else nn.Identity()
        self.drop_path2 = drop_path2 if drop_path2 is not None else nn.Identity()

    @classmethod
    def from_block(cls, block: nn.Module, r: int) -> "ToMeBlock":
        """Build from a timm ``Block``, sharing (not copying) its modules and so its weights; its ``attn``
        becomes a :class:`ToMeAttention`."""
        return cls(block.norm1, ToMeAttention.from_attention(block.attn), block.norm2, block.mlp, r,
                   ls1=block.ls1, drop_path1=block.drop_path1, ls2=block.ls2, drop_path2=block.drop_path2)

    def forward(self, x: torch.Tensor, size: Size = None) -> tuple[torch.Tensor, Size]:
        attn_out, metric = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attn_out))
        r = min(self.r, max_merge(x.shape[1]))
        if r > 0:
            x, size = merge_weighted(x, size, bipartite_soft_matching(metric, r))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), size

    def extra_repr(self) -> str:
        return f"r={self.r}"


class ToMeBlocks(nn.Sequential):
    """``model.blocks`` for a model with :class:`ToMeBlock` s: passes the token sizes from one to the next.

    Other blocks (e.g. a block whose attention was skipped) get the tokens only. The children keep their
    names (``0``, ``1``, …), so the model's state-dict keys do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size: Size = None
        for block in self:
            if isinstance(block, ToMeBlock):
                x, size = block(x, size)
            else:
                x = block(x)
        return x
