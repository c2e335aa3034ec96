"""BinaryAttention: ShiftAddViT's add-only attention over binary query/key codes, linear in the token count.

ShiftAddViT (You et al., NeurIPS 2023), after Castling-ViT's angular kernel ``1 − arccos(q·k)/π ≈ ½ + q·k/π``.
Per head: q and k are L2-normalised per token, then binarised to {0, 1} codes ``b = 1[x − mean_d(x) > 0]``
(mean over the head's channels of each token, so a token's code never depends on other images of the
batch; the gradient passes straight through, |x − mean| ≤ 2 after the normalisation). With the implied
attention matrix ``A = ½·I + (1/π)·B_q B_kᵀ`` (non-negative) and row normalisation::

    out_i = (½·v_i + (1/π)·b_q,i (B_kᵀ V)) / (½ + (1/π)·b_q,i (B_kᵀ 1))

``B_kᵀ V`` (d×d) and ``B_kᵀ 1`` are sums of value rows selected by the codes, i.e. additions; the whole
form costs O(n·d²) and never builds the n×n matrix. The denominator is ≥ ½, so it is safe in any precision.
The released code instead L2-normalises the output and adds a depth-wise token convolution; we keep the
attention a convex combination of values, which keeps the scale the pretrained ``proj`` expects.

Deploy form (:func:`binary_attention_deploy`): the L2 normalisation divides a row by its positive norm, which
changes no sign of ``x − mean(x)``, so the codes are ``1[x > mean(x)]`` without it; and ``B_kᵀ[V, 1]`` gives
``B_kᵀV`` and ``B_kᵀ1`` in one product, so one more product ``b_q(B_kᵀ[V, 1])`` gives numerator and
denominator together. Two MatMuls per head in onnxruntime instead of the training form's chain.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SELF_WEIGHT = 0.5
CODE_WEIGHT = 1.0 / math.pi


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """{0,1} codes of the L2-normalised rows of ``x`` (…, d): ``1[x̂ − mean(x̂) > 0]``, straight-through."""
    normalised = F.normalize(_at_least_fp32(x), dim=-1)
    centred = normalised - normalised.mean(-1, keepdim=True)
    hard = (centred > 0).to(centred.dtype)
    return hard + (centred - centred.detach())


def binary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear form over (B, H, N, d) inputs; returns (B, H, N, d) in ``v``'s dtype."""
    b_q, b_k, values = binary_codes(q), binary_codes(k), _at_least_fp32(v)
    kv = b_k.transpose(-2, -1) @ values
    k_sum = b_k.sum(-2, keepdim=True)
    numerator = SELF_WEIGHT * values + CODE_WEIGHT * (b_q @ kv)
    denominator = SELF_WEIGHT + CODE_WEIGHT * (b_q * k_sum).sum(-1, keepdim=True)
    return (numerator / denominator).to(v.dtype)


def binary_attention_deploy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`binary_attention` for inference (no gradient): codes ``1[x > mean(x)]`` and one product
    ``b_q(B_kᵀ[V, 1])`` for numerator and denominator; equal up to float rounding of ties at the mean."""
    values = _at_least_fp32(v)
    b_q, b_k = ((x > x.mean(-1, keepdim=True)).to(values.dtype) for x in (q, k))
    ones = torch.ones_like(values[..., :1])
    both = b_q @ (b_k.transpose(-2, -1) @ torch.cat([values, ones], -1))
    out = (SELF_WEIGHT * values + CODE_WEIGHT * both[..., :-1]) / (SELF_WEIGHT + CODE_WEIGHT * both[..., -1:])
    return out.to(v.dtype)


def binary_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through the explicit n×n matrix ``½·I + (1/π)·B_q B_kᵀ`` (reference, O(n²))."""
    b_q, b_k = binary_codes(q), binary_codes(k)
    eye = torch.eye(q.shape[-2], dtype=b_q.dtype, device=q.device)
    weights = SELF_WEIGHT * eye + CODE_WEIGHT * (b_q @ b_k.transpose(-2, -1))
    return ((weights @ _at_least_fp32(v)) / weights.sum(-1, keepdim=True)).to(v.dtype)


class BinaryAttention(nn.Module):
    """timm ``Attention`` with softmax attention replaced by :func:`binary_attention` (same qkv/proj)."""

    def __init__(self, num_heads: int, head_dim: int, qkv: nn.Linear, proj: nn.Module,
                 q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, proj_drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.qkv, self.proj = qkv, proj
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()
        self.deploy = False

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "BinaryAttention":
        """Build from a timm ``Attention``, sharing (not copying) its modules and so its weights."""
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported")
        return cls(attn.num_heads, attn.head_dim, attn.qkv, attn.proj, q_norm=attn.q_norm, k_norm=attn.k_norm,
                   norm=getattr(attn, "norm", None), proj_drop=attn.proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("BinaryAttention supports neither attention masks nor causal attention")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = binary_attention_deploy if self.deploy else binary_attention
        out = attention(self.q_norm(q), self.k_norm(k), v)
        out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        return self.proj_drop(self.proj(out))

    def to_deploy(self) -> "BinaryAttention":
        """The same attention (same modules) computing :func:`binary_attention_deploy`, in eval mode."""
        deployed = BinaryAttention(self.num_heads, self.head_dim, self.qkv, self.proj, self.q_norm, self.k_norm,
                                   self.norm, self.proj_drop)
        deployed.deploy = True
        return deployed.eval()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, codes=binary"
