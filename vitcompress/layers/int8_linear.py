"""Int8PotLinear: a Linear whose weight is int8 times a per-output-channel power of two, run on int8 kernels.

A power-of-two weight matrix (ShiftAddViT's shift layers) whose exponents span at most 7 levels per output
channel ``c`` is *exactly* ``W_pot[c] = w_int[c] · 2^{e_min,c}`` with ``w_int ∈ {0, ±1, ±2, …, ±64}`` ⊂ int8.
(8 levels would need +128, which int8 cannot hold.) ``|w_int| ≤ 64`` also keeps the u8·s8 pair sums of
AVX2 kernels (``vpmaddubsw``: 2·255·64 < 2¹⁵) free of int16 saturation, so the integer product is exact.

The activation is quantised the way onnxruntime's dynamic quantisation does it (ONNX
``DynamicQuantizeLinear``: uint8, per tensor, asymmetric), the product runs as ``MatMulInteger`` (int32
accumulation) and is rescaled by ``x_scale · w_scale[c]``. In torch the same computation is the custom op
``vitcompress::int8_linear``: integer-valued float32 matmul, exact because every partial sum is an integer
below 2²⁴ (255·64·in_features < 2²⁴ for in_features ≤ 1028) or, above that, computed in float64. The export
stage maps the op to the ONNX nodes with :data:`ONNX_TRANSLATIONS`, so ORT's int8 kernels run it.

Note the per-tensor activation scale: like every ORT dynamic quantisation, the result for one image depends
(slightly) on the other images of its batch.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from vitcompress.layers.int8_levels import INT8_LEVELS

QMAX = 255.0


@torch.library.custom_op("vitcompress::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``DynamicQuantizeLinear(x)`` · ``w_int``ᵀ (exact integer product) · ``x_scale·w_scale`` + ``bias``."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if flat.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], w_int.shape[0])
    low, high = flat.min().clamp(max=0), flat.max().clamp(min=0)
    x_scale = (high - low) / QMAX
    zero_point = torch.round(-low / x_scale).clamp(0, QMAX)
    centred = torch.round(flat / x_scale).add(zero_point).clamp(0, QMAX) - zero_point
    exact_dtype = torch.float32 if x.shape[-1] * QMAX * 64 < 2**24 else torch.float64
    product = (centred.to(exact_dtype) @ w_int.to(exact_dtype).T).float()
    out = product * (x_scale * w_scale) + bias
    return out.reshape(*x.shape[:-1], w_int.shape[0]).to(x.dtype)


@int8_linear.register_fake
def _int8_linear_fake(x, w_int, w_scale, bias):
    return x.new_empty(*x.shape[:-1], w_int.shape[0])


@register_flop_formula(torch.ops.vitcompress.int8_linear)
def _int8_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """Count the int8 multiply–accumulates like a Linear's (2 FLOPs per MAC): same count, cheaper kind."""
    tokens = 1
    for size in x_shape[:-1]:
        tokens *= size
    return 2 * tokens * w_shape[0] * w_shape[1]


def _int8_linear_onnx(x, w_int, w_scale, bias):
    x_q, x_scale, x_zero = op.DynamicQuantizeLinear(x)
    product = op.MatMulInteger(x_q, op.Transpose(w_int, perm=[1, 0]), x_zero)
    return op.Add(op.Mul(op.Cast(product, to=1), op.Mul(x_scale, w_scale)), bias)


ONNX_TRANSLATIONS = {torch.ops.vitcompress.int8_linear.default: _int8_linear_onnx}


class Int8PotLinear(nn.Module):
    """``y = int8_linear(x)``: int8 weight ``w_int`` (out×in), per-channel scale ``w_scale`` (powers of two)."""

    def __init__(self, w_int: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if w_int.dtype != torch.int8 or w_int.abs().max() > 2 ** (INT8_LEVELS - 1):
            raise ValueError(f"w_int must be int8 within ±{2 ** (INT8_LEVELS - 1)}")
        self.out_features, self.in_features = w_int.shape
        self.register_buffer("w_int", w_int)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("bias", bias.detach().float() if bias is not None else torch.zeros(self.out_features))

    @classmethod
    def from_pot(cls, weight: torch.Tensor, low_exponent: torch.Tensor, bias: torch.Tensor | None) -> "Int8PotLinear":
        """From a power-of-two ``weight`` (out×in) whose nonzero exponents in row c are ≥ ``low_exponent[c]``
        and < ``low_exponent[c] + 7``; raises if the int8 weights would not reproduce ``weight`` exactly."""
        scale = torch.exp2(low_exponent.double().reshape(-1))
        w_int = weight.double() / scale[:, None]
        if not torch.equal(w_int, w_int.round()) or w_int.abs().max() > 2 ** (INT8_LEVELS - 1):
            raise ValueError("weight is not int8 × per-channel power of two within 7 levels")
        layer = cls(w_int.to(torch.int8), scale.float(), bias)
        if not torch.equal(layer.weight(), weight.float()):
            raise ValueError("int8 weights do not reproduce the power-of-two weight exactly")
        return layer

    def weight(self) -> torch.Tensor:
        """The float weight the int8 form represents: ``w_int · w_scale`` (exact, both factors are exact)."""
        return self.w_int.float() * self.w_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vitcompress.int8_linear(x, self.w_int, self.w_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8·2^e per channel"
