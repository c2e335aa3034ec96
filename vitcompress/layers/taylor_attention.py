"""TaylorAttention: softmax attention replaced by its first-order Taylor form, linear in the token count.

ViTALiTy (Dass et al., "ViTALiTy: Unifying Low-rank and Sparse Approximation for Vision Transformer
Acceleration with a Linear Taylor Attention", HPCA 2023). Per head, with ``n`` tokens, ``s = 1/√d`` and
``exp(x) ≈ 1 + x``::

    out_i = Σ_j (1 + s·q_i·k̂_j) v_j / Σ_j (1 + s·q_i·k̂_j)
          = (v_sum + s·q_i G) / (n + s·q_i·k_sum),   G = K̂ᵀV (d×d), v_sum = 1ᵀV, k_sum = 1ᵀK̂

The right-hand side is the same sum reordered: it never forms the n×n attention matrix, so it costs
O(n·d²) instead of O(n²·d). The keys are mean-centred, ``K̂ = K − mean``, which keeps ``s·q·k̂`` small
where the expansion is accurate:

* ``center="tokens"`` (the default): the mean over the n keys. Then ``k_sum = 0``, the denominator is the
  constant ``n``, and since a per-query shift of the logits does not change a softmax, the expansion is the
  linearisation of the original ``softmax(s·QKᵀ)`` itself (around uniform attention);
* ``center="channels"`` (the paper's row-mean centring, as its released code does it): the mean over the d
  channels of each token's key. That changes the logits by a per-key amount, so it does not approximate the original softmax, and its
  denominator ``n + s·q_i·k_sum`` crosses 0 once logits reach O(1): on a pretrained model it is
  ill-conditioned (measured on ``vit_fmnist``: 12.9 % top-1, and torch and onnxruntime differ by up to 4 in
  the logits because the guarded denominator amplifies rounding).

The kernel is evaluated in float32 (fp16/bf16 inputs are cast up, the result is cast back). A Taylor weight
``1 + x`` can be negative, so the denominator of the channel-centred form can approach 0: it is kept at
least ``DENOMINATOR_EPS · n`` away from 0 with its sign preserved (0 counts as positive). With small logits
the denominator is ≈ n and the guard never acts.

Training-only sparse branch (the paper's sparsity regulariser): in ``train()`` mode, and only when a threshold
is set, the output gains ``(1[P > τ] ⊙ P) V`` with ``P = softmax(fq₄(s·QKᵀ))``, where ``fq₄`` is a symmetric
per-tensor 4-bit fake quantiser with a straight-through estimator so gradients reach the qkv weights.
:meth:`TaylorAttention.to_deploy` removes it, so the exported graph holds only the linear form.

The released ViTALiTy code is broken: it drops the constant term ``1`` and the normalisation (the
denominator) and keeps the sparse branch at inference. This module follows the formula above instead.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn

Center = Literal["channels", "tokens"]

DENOMINATOR_EPS = 1e-4
"""Least |denominator| as a fraction of ``n`` (the denominator's value when all logits are 0)."""

QUANT_BITS = 4


def fake_quantize(x: torch.Tensor, bits: int = QUANT_BITS) -> torch.Tensor:
    """Symmetric per-tensor fake quantisation to ``bits`` bits (levels −(2^(b−1)−1)…2^(b−1)−1) with a
    straight-through estimator: the forward value is quantised, the gradient is the identity."""
    levels = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny) / levels
    quantised = torch.clamp(torch.round(x.detach() / scale), -levels, levels) * scale
    return x + (quantised - x.detach())


def taylor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, center: Center = "tokens"
) -> torch.Tensor:
    """The linear Taylor form on ``(…, n, d)`` query/key/value tensors (no n×n tensor is formed).

    Lower-precision inputs are computed in float32 and the result is returned in the input dtype.
    """
    dtype = q.dtype
    if torch.finfo(dtype).bits < 32:
        q, k, v = q.float(), k.float(), v.float()
    n = k.shape[-2]
    k_hat = k - k.mean(dim=-1 if center == "channels" else -2, keepdim=True)
    q = q * scale
    numerator = v.sum(dim=-2, keepdim=True) + q @ (k_hat.transpose(-2, -1) @ v)
    if center == "tokens":
        out = numerator / n
    else:
        denominator = n + q @ k_hat.sum(dim=-2).unsqueeze(-1)
        eps = DENOMINATOR_EPS * n
        denominator = torch.where(denominator >= 0, denominator.clamp_min(eps), denominator.clamp_max(-eps))
        out = numerator / denominator
    return out.to(dtype)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, threshold: float,
    attn_drop: Optional[nn.Module] = None,
) -> torch.Tensor:
    """``(1[P > τ] ⊙ P) V`` with ``P = softmax(fq₄(s·QKᵀ))``: the training-only sparse branch (O(n²)).

    Computed in float32 like the linear form; the result is returned in the input dtype.
    """
    dtype = q.dtype
    if torch.finfo(dtype).bits < 32:
        q, k, v = q.float(), k.float(), v.float()
    probs = fake_quantize((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    probs = probs * (probs > threshold).to(probs.dtype)
    if attn_drop is not None:
        probs = attn_drop(probs)
    return (probs @ v).to(dtype)


class TaylorAttention(nn.Module):
    """Drop-in for timm's ``Attention``: same submodules (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``,
    dropouts, optional ``gate``) and state-dict keys, with the softmax kernel replaced by the Taylor form.

    ``attn_drop`` acts only on the sparse branch's attention matrix: the linear form has no attention matrix
    to drop from.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        qkv: nn.Linear,
        proj: nn.Module,
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        norm: Optional[nn.Module] = None,
        gate: Optional[nn.Module] = None,
        attn_drop: Optional[nn.Module] = None,
        proj_drop: Optional[nn.Module] = None,
        center: Center = "tokens",
        sparse_threshold: Optional[float] = None,
    ) -> None:
        super().__init__()
        if center not in ("channels", "tokens"):
            raise ValueError(f"center must be 'channels' or 'tokens', got {center!r}")
        if sparse_threshold is not None and not 0 < sparse_threshold < 1:
            raise ValueError(f"sparse_threshold must lie in (0, 1), got {sparse_threshold}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.center: Center = center
        self.sparse_threshold = sparse_threshold
        self.qkv = qkv
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = attn_drop if attn_drop is not None else nn.Identity()
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_attention(
        cls, attn: nn.Module, center: Center = "tokens", sparse_threshold: Optional[float] = None
    ) -> "TaylorAttention":
        """Build from a timm ``Attention``, sharing (not copying) its modules and so its weights."""
        return cls(
            attn.num_heads, attn.head_dim, attn.qkv, attn.proj,
            q_norm=attn.q_norm, k_norm=attn.k_norm, norm=getattr(attn, "norm", None),
            gate=getattr(attn, "gate", None), attn_drop=attn.attn_drop, proj_drop=attn.proj_drop,
            center=center, sparse_threshold=sparse_threshold,
        )

    def to_deploy(self) -> "TaylorAttention":
        """The same layer (shared modules) without the training-only sparse branch."""
        deployed = TaylorAttention(
            self.num_heads, self.head_dim, self.qkv, self.proj, q_norm=self.q_norm, k_norm=self.k_norm,
            norm=self.norm, gate=self.gate, attn_drop=self.attn_drop, proj_drop=self.proj_drop,
            center=self.center, sparse_threshold=None,
        )
        return deployed.train(self.training)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` (B, N, C) as (B, heads, N, head_dim), after q_norm / k_norm."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TaylorAttention supports neither attention masks nor causal attention")
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv_heads(x)
        out = taylor_attention(q, k, v, self.scale, self.center)
        if self.training and self.sparse_threshold is not None:
            out = out + sparse_attention(q, k, v, self.scale, self.sparse_threshold, self.attn_drop)
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, center={self.center}, "
                f"sparse_threshold={self.sparse_threshold}")
