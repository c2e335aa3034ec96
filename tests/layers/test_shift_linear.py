import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vitcompress.deploy.runtime import open_session
from vitcompress.export import export_onnx
from vitcompress.layers.int8_linear import Int8PotLinear
from vitcompress.layers.shift_linear import ShiftLinear


def _linear(out_features=48, in_features=32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_power_of_two_weights_are_exact():
    linear = _linear()
    gen = torch.Generator().manual_seed(1)
    exponents = torch.randint(-9, -2, linear.weight.shape, generator=gen).float()
    signs = torch.randint(0, 2, linear.weight.shape, generator=gen).float() * 2 - 1
    with torch.no_grad():
        linear.weight.copy_(signs * torch.exp2(exponents))
    shift = ShiftLinear.from_linear(linear, levels=7)
    assert torch.equal(shift.pot_weight(), linear.weight)
    x = torch.randn(5, 32)
    torch.testing.assert_close(shift(x), linear(x), rtol=0, atol=0)


def test_init_error_is_bounded_by_log_rounding():
    """|W − W_pot| ≤ (√2 − 1)|W| element-wise when no exponent is clamped (enough levels for the row)."""
    linear = _linear()
    shift = ShiftLinear.from_linear(linear, levels=32, int8=False)
    weight, pot = linear.weight.detach(), shift.pot_weight().detach()
    assert (torch.sign(pot) == torch.sign(weight)).all()
    assert ((weight - pot).abs() <= (math.sqrt(2) - 1) * weight.abs() + 1e-12).all()
    assert ((weight - pot).abs() > 0.3 * weight.abs()).any(), "the bound should be nearly tight somewhere"


def test_exponent_range_per_channel_and_flush_to_zero():
    linear = _linear()
    shift = ShiftLinear.from_linear(linear, levels=3)
    pot = shift.pot_weight().detach()
    nonzero = pot != 0
    exponents = torch.log2(pot.abs().clamp_min(1e-30))
    assert ((exponents >= shift.low()) | ~nonzero).all() and (exponents <= shift.top).all()
    weight = linear.weight.detach()
    small = weight.abs() < torch.exp2(shift.low() - 1)
    assert small.any() and (pot[small] == 0).all(), "weights below half the lowest level become 0"
    error = (weight - pot).abs()
    assert (error[small] <= torch.exp2(shift.low() - 1).expand_as(weight)[small]).all()


def test_straight_through_gradients_reach_sign_and_exponent():
    shift = ShiftLinear.from_linear(_linear())
    shift(torch.randn(4, 32)).pow(2).sum().backward()
    assert shift.exponent.grad.abs().sum() > 0 and shift.sign.grad.abs().sum() > 0 and shift.bias.grad is not None


def test_int8_weights_reproduce_w_pot_bit_exactly():
    linear = nn.Linear(192, 768)
    shift = ShiftLinear.from_linear(linear, levels=7)
    deployed = shift.to_deploy()
    assert isinstance(deployed, Int8PotLinear) and deployed.w_int.dtype == torch.int8
    assert deployed.w_int.abs().max() <= 64
    scale_exponents = torch.log2(deployed.w_scale)
    assert torch.equal(scale_exponents, scale_exponents.round()), "scales are powers of two"
    assert torch.equal(deployed.weight(), shift.pot_weight().detach())
    float_form = ShiftLinear.from_linear(linear, levels=7, int8=False).to_deploy()
    assert isinstance(float_form, nn.Linear) and torch.equal(float_form.weight, deployed.weight())


def test_int8_rejects_what_int8_cannot_hold():
    with pytest.raises(ValueError, match="levels"):
        ShiftLinear(4, 4, levels=8, int8=True)
    weight = torch.tensor([[1.0, 2.0 ** -7], [0.5, 0.25]])
    with pytest.raises(ValueError, match="7 levels"):
        Int8PotLinear.from_pot(weight, torch.tensor([-7.0, -2.0]), None)


def test_int8_op_matches_float_within_activation_quantisation():
    """Only the activation is rounded (uint8, step s_x): |error| ≤ s_x/2 · Σ_j |W_pot[c, j]| per output."""
    shift = ShiftLinear.from_linear(_linear(64, 96))
    layer = shift.to_deploy()
    x = torch.randn(10, 96)
    x_step = (x.max() - x.min()) / 255
    bound = x_step / 2 * layer.weight().abs().sum(1)
    error = (layer(x) - nn.functional.linear(x, layer.weight(), layer.bias)).abs()
    assert (error <= bound + 1e-5).all()


@pytest.mark.export
def test_int8_layer_runs_as_matmulinteger_in_onnxruntime_exactly(tmp_path):
    layer = ShiftLinear.from_linear(_linear(64, 96)).to_deploy()
    path = export_onnx(nn.Sequential(layer), tmp_path / "layer.onnx", input_size=(7, 96))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMul" not in ops
    w_int = next(i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8)
    assert np.array_equal(np.sort(onnx.numpy_helper.to_array(w_int).ravel()), np.sort(layer.w_int.numpy().ravel()))
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(0))
    got = open_session(path, threads=1).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-6, atol=1e-6)
