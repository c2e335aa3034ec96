"""ShiftLinear: a Linear whose weights are signed powers of two, so each product is a bit shift.

ShiftAddViT (You et al., NeurIPS 2023), after DeepShift-PS (Elhoushi et al. 2021): the weight is
``W_pot = s · 2^e`` with a ternary sign ``s ∈ {−1, 0, +1}`` and an integer exponent ``e``, both trained through
straight-through estimators (round and sign act in the forward pass, the gradient passes as identity).

Initialisation from a pretrained ``W``: ``e = round(log2|W|)`` and ``s = sign(W)``. Rounding in the log domain
bounds the relative error: with ``|W| = 2^{e+δ}``, ``|δ| ≤ ½``, ``|W − W_pot| = |W|·|1 − 2^{−δ}| ≤ (√2 − 1)|W|``.

Exponent range: each output channel ``c`` keeps ``levels`` exponents, ``top_c − levels + 1 … top_c`` with
``top_c`` the largest initial exponent of the row. A weight below the range goes to the nearer of
``0`` (sign 0) and the smallest level. With ``levels ≤ 7`` the deploy form is *exactly* an int8 weight with a
per-channel power-of-two scale (:class:`~vitcompress.layers.int8_linear.Int8PotLinear`); otherwise a
float Linear holding ``W_pot``. Either way :meth:`ShiftLinear.to_deploy` folds it to constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.layers.int8_levels import INT8_LEVELS
from vitcompress.layers.int8_linear import Int8PotLinear


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (exactly: ``x − x.detach()`` is 0), identity gradient (straight-through estimator)."""
    return torch.round(x).detach() + (x - x.detach())


class ShiftLinear(nn.Module):
    """``y = x · W_potᵀ + b`` with ``W_pot = round(clamp(sign)) · 2^{clamp(round(exponent), top−levels+1, top)}``."""

    def __init__(self, in_features: int, out_features: int, levels: int = INT8_LEVELS, bias: bool = True,
                 int8: bool = True) -> None:
        super().__init__()
        if levels < 1 or (int8 and levels > INT8_LEVELS):
            raise ValueError(f"levels must be in 1..{INT8_LEVELS if int8 else '∞'} (int8={int8}), got {levels}")
        self.in_features, self.out_features, self.levels, self.int8 = in_features, out_features, levels, int8
        self.exponent = nn.Parameter(torch.zeros(out_features, in_features))
        self.sign = nn.Parameter(torch.ones(out_features, in_features))
        self.register_buffer("top", torch.zeros(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, levels: int = INT8_LEVELS, int8: bool = True) -> "ShiftLinear":
        """Sign and exponent from ``linear.weight`` (round(log2|W|)), bias copied."""
        weight = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, levels, linear.bias is not None, int8)
        magnitude = weight.abs()
        exponent = torch.round(torch.log2(magnitude.clamp_min(torch.finfo(torch.float32).tiny)))
        top = exponent.amax(dim=1, keepdim=True)
        low = top - levels + 1
        # Below the range: nearer of 0 and 2^low; the midpoint is 2^(low−1).
        keep = magnitude >= torch.exp2(low - 1)
        with torch.no_grad():
            layer.exponent.copy_(torch.maximum(exponent, low))
            layer.sign.copy_(torch.sign(weight) * keep)
            layer.top.copy_(top)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def low(self) -> torch.Tensor:
        """Smallest exponent of each output channel, (out, 1)."""
        return self.top - self.levels + 1

    def pot_weight(self) -> torch.Tensor:
        """``W_pot`` (out×in); differentiable w.r.t. sign and exponent through straight-through estimators."""
        exponent = torch.clamp(round_ste(self.exponent), self.low(), self.top)
        sign = round_ste(torch.clamp(self.sign, -1, 1))
        return sign * torch.exp2(exponent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.pot_weight().to(x.dtype), self.bias)

    def to_deploy(self) -> nn.Module:
        """Constant form: :class:`Int8PotLinear` (exact, int8 kernels) when ``int8``, else a float Linear."""
        with torch.no_grad():
            weight = self.pot_weight()
            if self.int8:
                return Int8PotLinear.from_pot(weight, self.low(), self.bias)
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
            return linear.eval()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, levels={self.levels}, "
                f"int8={self.int8}")
