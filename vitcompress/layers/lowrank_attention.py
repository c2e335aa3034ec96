"""HeadMajorAttention: the deploy form of a timm ``Attention`` whose ``qkv`` (and maybe ``proj``) is low-rank.

timm computes ``qkv(x)`` as one (B, N, 3C) tensor, then reshapes and permutes it to (3, B, H, N, D), splits
it, and after the attention transposes (B, H, N, D) back to (B, N, C) for ``proj``. In onnxruntime those are
a Reshape, a Transpose and a Split per block before the attention and a Transpose after it: on DeiT-S with
every Linear factored (``fast``), the 61 Transposes alone took 38 of 343 ms at batch 8 (profiled,
2026-12-03, AMD EPYC, 2 threads).

With ``qkv = second ∘ first`` (:class:`~vitcompress.layers.lowrank_linear.LowRankLinear`) the per-head
tensors can be made directly in head-major order: ``h = first(x)`` is (B, 1, N, r), and the rows of
``second`` that make head ``i``'s queries are an r×D matrix ``W_q[i]``, so ``q = h @ W_q + b_q`` broadcasts
to (B, H, N, D) with no reshape or transpose (the same MACs). The softmax scale ``D^-½`` is folded into
``W_q`` and ``b_q``. When ``proj`` is low-rank too, ``proj.first`` (r_p × C) split by input columns is one
D×r_p matrix per head, so ``proj.first(concat_heads(o)) = Σ_i o_i @ U[i]``: a batched MatMul and a sum over
the head axis replace the transpose back. A dense ``proj`` keeps the transpose. Exact up to float rounding.

:class:`AbsorbedAttention` goes one step further when ``proj`` is low-rank too and both ranks are below the head
dimension D, by absorbing weight products as DeepSeek-V2's multi-head latent attention does at inference
(DeepSeek-AI 2024, §2.1.3): every head reads the same rank-r ``h``, so

* scores: ``q_i k_iᵀ = (h W_q[i] + b_q[i]) (h W_k[i] + b_k[i])ᵀ``. The ``b_k`` terms add ``q_i · b_k[i]``, the
  same for every key of a query, which the softmax cancels; what is left is ``(h M_i + c_i) hᵀ`` with
  ``M_i = W_q[i] W_k[i]ᵀ`` (r×r) and ``c_i = b_q[i] W_k[i]ᵀ``: inner dimension r instead of D;
* values: ``Σ_i P_i (h W_v[i] + b_v[i]) U[i] = Σ_i P_i (h N_i) + Σ_i b_v[i] U[i]`` with ``N_i = W_v[i] U[i]``
  (r × r_p), because each softmax row ``P_i`` sums to 1; the constant goes into ``proj``'s bias.

The heads run as three plain matrix products instead of per-head batched ones: ``h [M_1 … M_H] + [c_1 … c_H]`` is
one Linear (r → H·r) whose (N, H·r) output, read as (N·H, r), holds every head's queries, so one product with
``hᵀ`` gives all scores, row ``n·H + i``; read as (N, H·N) the softmaxed scores of token ``n`` are ``[P_1 … P_H]``
row ``n``, and ``Σ_i P_i V_i`` is that times the heads' values stacked, ``[V_1; …; V_H]`` (H·N × r_p), from one
Linear (r → H·r_p) and one small transpose. No sum over a head axis and no broadcast batch of H small products.

On DeiT-S with every block Linear at rank 1/8 (r = r_p = 48, D = 64) a block's attention costs 35 M MACs instead
of 51 M, and onnxruntime (2 threads, interleaved) ran the whole model 1.21× / 1.18× faster at batch 1 / 8 than
the head-major form (measured 2026-12-04, AMD EPYC); the plain products were another 3–5 % at batch 1 against
per-head batched ones (three interleaved rounds, Intel Xeon, 2026-12-05).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitcompress.layers.lowrank_linear import LowRankLinear

#: The timm ``Attention`` submodules that must be identities for the rewrite to be exact.
IDENTITY_PARTS = ("q_norm", "k_norm", "norm")


class HeadMajorAttention(nn.Module):
    """Multi-head self-attention computed head-major from a rank-r ``qkv`` (see the module docstring).

    ``qkv`` holds only the shared first factor (in → r): under that name the profiler still attributes its
    nodes to the recipe step that factored ``qkv``.
    """

    def __init__(self, first: nn.Linear, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, proj: nn.Module,
                 proj_heads: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.num_heads = qkv_weight.shape[1]
        self.qkv = first
        self.q_weight, self.k_weight, self.v_weight = (nn.Parameter(w.contiguous()) for w in qkv_weight)
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(b.contiguous()) for b in qkv_bias)
        self.proj_heads = None if proj_heads is None else nn.Parameter(proj_heads.contiguous())
        self.proj = proj

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """Whether ``module`` is a plain timm ``Attention`` (no q/k norm, scale norm or gate) with a low-rank
        ``qkv``: what :meth:`from_attention` can rewrite exactly."""
        from timm.layers.attention import Attention

        return (type(module) is Attention and _plain_lowrank(module.qkv)
                and (_plain_lowrank(module.proj) or type(module.proj) is nn.Linear)
                and getattr(module, "gate", None) is None
                and all(isinstance(getattr(module, p, nn.Identity()), nn.Identity) for p in IDENTITY_PARTS))

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "HeadMajorAttention":
        """The head-major form of a timm ``Attention`` that :meth:`accepts` (its weights copied, not shared)."""
        if not cls.accepts(attn):
            raise TypeError(f"{type(attn).__name__} is not a timm Attention with a low-rank qkv and no q/k norm")
        heads, head_dim, rank = attn.num_heads, attn.head_dim, attn.qkv.rank
        with torch.no_grad():
            second = attn.qkv.second.weight.detach()  # (3·H·D, r): rows ordered (q|k|v, head, dim) as timm's reshape
            weight = second.reshape(3, heads, head_dim, rank).transpose(-1, -2).clone()  # (3, H, r, D)
            bias = (attn.qkv.second.bias.detach() if attn.qkv.second.bias is not None
                    else second.new_zeros(second.shape[0])).reshape(3, heads, 1, head_dim).clone()
            weight[0] *= attn.scale
            bias[0] *= attn.scale
            first = nn.Linear(attn.qkv.in_features, rank, bias=False)
            first.weight.copy_(attn.qkv.first.weight)
            proj, proj_heads = attn.proj, None
            if _plain_lowrank(attn.proj):
                proj_heads = attn.proj.first.weight.detach().T.reshape(heads, head_dim, attn.proj.rank).clone()
                proj = attn.proj.second
        return cls(first.to(second.device), weight, bias, proj, proj_heads)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("HeadMajorAttention is a ViT encoder's attention: no attention mask, not causal")
        h = self.qkv(x).unsqueeze(1)
        q = h @ self.q_weight + self.q_bias
        k = h @ self.k_weight + self.k_bias
        v = h @ self.v_weight + self.v_bias
        out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        if self.proj_heads is not None:
            return self.proj((out @ self.proj_heads).sum(dim=1))
        batch, _, tokens, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class AbsorbedAttention(nn.Module):
    """Multi-head self-attention with ``W_q W_kᵀ`` and ``W_v U`` absorbed per head (see the module docstring).

    ``qkv`` holds the shared first factor (in → r) and ``proj`` the second factor of ``proj`` (r_p → out), under
    their timm names so the profiler attributes their nodes to the recipe step that factored them; ``scores``
    (r → H·r, bias ``c``) and ``values`` (r → H·r_p) hold every head's absorbed matrices side by side.
    """

    def __init__(self, first: nn.Linear, scores: nn.Linear, values: nn.Linear, proj: nn.Linear,
                 num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.scores, self.values, self.proj = first, scores, values, proj

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """Whether ``module`` is a timm ``Attention`` that :meth:`HeadMajorAttention.accepts` with a low-rank
        ``proj`` and both ranks below the head dimension (else absorbing would add MACs)."""
        return (HeadMajorAttention.accepts(module) and _plain_lowrank(module.proj)
                and max(module.qkv.rank, module.proj.rank) < module.head_dim)

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "AbsorbedAttention":
        """The absorbed form of a timm ``Attention`` that :meth:`accepts` (its weights copied, not shared)."""
        if not cls.accepts(attn):
            raise TypeError(f"{type(attn).__name__} is not a timm Attention with low-rank qkv and proj of ranks "
                            "below its head dimension")
        head_major = HeadMajorAttention.from_attention(attn)
        heads, rank, proj_rank = attn.num_heads, attn.qkv.rank, attn.proj.rank
        device = attn.qkv.first.weight.device
        with torch.no_grad():
            keys_t = head_major.k_weight.transpose(-1, -2)  # (H, D, r); q_weight/q_bias already hold the scale
            scores = nn.Linear(rank, heads * rank).to(device)  # output column i·r + j: (h M_i + c_i)[j]
            scores.weight.copy_((head_major.q_weight @ keys_t).transpose(-1, -2).reshape(heads * rank, rank))
            scores.bias.copy_((head_major.q_bias @ keys_t).reshape(-1))
            values = nn.Linear(rank, heads * proj_rank, bias=False).to(device)  # column i·r_p + j: (h N_i)[j]
            values.weight.copy_((head_major.v_weight @ head_major.proj_heads).transpose(-1, -2)
                                .reshape(heads * proj_rank, rank))
            constant = (head_major.v_bias @ head_major.proj_heads).sum(dim=0).squeeze(0)  # (r_p,)
            second = head_major.proj
            proj = nn.Linear(second.in_features, second.out_features).to(device)
            proj.weight.copy_(second.weight)
            bias = second.bias if second.bias is not None else torch.zeros_like(proj.bias)
            proj.bias.copy_(bias + second.weight @ constant)
        return cls(head_major.qkv, scores, values, proj, heads)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("AbsorbedAttention is a ViT encoder's attention: no attention mask, not causal")
        batch, tokens, width = x.shape
        heads, rank = self.num_heads, self.qkv.out_features
        h = self.qkv(x.reshape(-1, width))  # (B·N, r)
        queries = self.scores(h).reshape(batch, tokens * heads, rank)  # row n·H + i: head i's query of token n
        scores = queries @ h.reshape(batch, tokens, rank).transpose(1, 2)  # (B, N·H, N)
        weights = scores.softmax(dim=-1).reshape(batch, tokens, heads * tokens)  # token n's [P_1 … P_H] row
        values = self.values(h).reshape(batch, tokens, heads, -1).transpose(1, 2).reshape(batch, heads * tokens, -1)
        mixed = weights @ values  # (B, N, r_p): Σ_i P_i V_i
        return self.proj(mixed.reshape(batch * tokens, -1)).reshape(batch, tokens, self.proj.out_features)


def _plain_lowrank(module: nn.Module) -> bool:
    """A :class:`LowRankLinear` whose two factors are still plain ``nn.Linear`` (no other transform on them)."""
    return (isinstance(module, LowRankLinear) and type(module.first) is nn.Linear
            and type(module.second) is nn.Linear)
