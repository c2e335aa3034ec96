import math

import pytest
import torch
from timm.models.vision_transformer import Attention

from vitcompress.layers.taylor_attention import (
    DENOMINATOR_EPS,
    TaylorAttention,
    fake_quantize,
    sparse_attention,
    taylor_attention,
)

DIM, HEADS, TOKENS = 96, 3, 50


def _attention(qk_scale: float = 1.0, seed: int = 0) -> Attention:
    """A timm Attention (head_dim 32) whose query/key rows of qkv are scaled by ``qk_scale`` (values untouched)."""
    torch.manual_seed(seed)
    attn = Attention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    with torch.no_grad():
        attn.qkv.weight[: 2 * DIM].mul_(qk_scale)
        attn.qkv.bias[: 2 * DIM].mul_(qk_scale)
    return attn


def _tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


def _heads64(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in float64 as (B, heads, N, head_dim), the layout of timm's Attention."""
    qkv = x.double() @ attn.qkv.weight.detach().double().T + attn.qkv.bias.detach().double()
    q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _proj64(attn: Attention, heads: torch.Tensor) -> torch.Tensor:
    merged = heads.transpose(1, 2).reshape(heads.shape[0], heads.shape[2], DIM)
    return merged @ attn.proj.weight.detach().double().T + attn.proj.bias.detach().double()


def _centred(k: torch.Tensor, center: str) -> torch.Tensor:
    return k - k.mean(dim=-1 if center == "channels" else -2, keepdim=True)


def _direct_taylor(q, k, v, center):
    """The O(n²) evaluation: Σ_j (1 + s·q_i·k̂_j) v_j / Σ_j (1 + s·q_i·k̂_j), with the n×n weight matrix."""
    weights = 1 + (q @ _centred(k, center).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (weights @ v) / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("center", ["channels", "tokens"])
def test_linear_form_equals_direct_quadratic_evaluation(center):
    """The reordering (v_sum + s·q G) / (n + s·q·k_sum) is the same sum as the n×n form."""
    attn = _attention(qk_scale=2.0)
    layer = TaylorAttention.from_attention(attn, center=center)
    x = _tokens()
    q, k, v = _heads64(attn, x)
    assert (q @ _centred(k, center).transpose(-2, -1)).abs().max() / math.sqrt(DIM // HEADS) > 0.3, \
        "logits too small: the first-order term would hardly matter"
    with torch.no_grad():
        got = layer(x)
    want = _proj64(attn, _direct_taylor(q, k, v, center))
    torch.testing.assert_close(got, want.float())
    # the kernel itself, in float64, is exact to rounding
    torch.testing.assert_close(taylor_attention(q, k, v, 1 / math.sqrt(q.shape[-1]), center),
                               _direct_taylor(q, k, v, center), rtol=1e-12, atol=1e-12)


def _softmax_case(qk_scale: float, center: str):
    """Taylor heads (the layer's fp32 kernel), the softmax heads it expands (same centred keys, float64),
    uniform-attention heads, the largest |logit| m, and the elementwise error bound.

    Row i, x_j = s·q_i·k̂_j with |x_j| ≤ m_i < 1; a_j = e^{x_j}, b_j = 1 + x_j, r_j = a_j − b_j ∈ [0, m_i²e^{m_i}/2]
    (|e^x − 1 − x| ≤ x²e^{|x|}/2). With A = Σa, B = Σb, R = Σr, t_j = b_j/B ≥ 0: a_j/A − b_j/B = (r_j − t_j R)/A,
    so ‖p − t‖₁ ≤ 2R/A ≤ 2·n·(m_i²e^{m_i}/2)/(n·e^{−m_i}) = m_i²e^{2m_i}. As Σ(p_j − t_j) = 0, output channel c
    moves by at most m_i²e^{2m_i}·max_j|v_jc − mid_c| (mid_c: the midpoint of channel c's value range).
    """
    attn = _attention(qk_scale)
    layer = TaylorAttention.from_attention(attn, center=center)
    x = _tokens()
    q, k, v = _heads64(attn, x)
    logits = q @ _centred(k, center).transpose(-2, -1) / math.sqrt(q.shape[-1])
    with torch.no_grad():
        taylor = taylor_attention(*layer.qkv_heads(x), layer.scale, center).double()
    softmax = logits.softmax(-1) @ v
    uniform = v.mean(-2, keepdim=True).expand_as(v)
    row_m = logits.abs().amax(-1, keepdim=True)
    half_range = (v.amax(-2, keepdim=True) - v.amin(-2, keepdim=True)) / 2
    bound = row_m**2 * torch.exp(2 * row_m) * half_range
    return taylor, softmax, uniform, row_m.max().item(), bound, attn, layer, x


@pytest.mark.parametrize("center", ["channels", "tokens"])
def test_close_to_softmax_for_small_logits_within_taylor_bound(center):
    taylor, softmax, uniform, m, bound, attn, layer, x = _softmax_case(qk_scale=0.3, center=center)
    assert 0.01 < m < 0.5, f"max |s·q·k̂| = {m} is not in the small-logit regime"
    error = (taylor - softmax).abs()
    assert (error <= bound).all(), f"|taylor − softmax| exceeds m²e^(2m)·half-range(v) by {(error - bound).max()}"
    # the first-order term matters: Taylor beats plain averaging of the values (error O(m²) vs O(m))
    assert error.max() < 0.2 * (uniform - softmax).abs().max()
    if center == "tokens":
        # a per-query shift of the logits leaves a softmax unchanged: the bound holds against timm's own
        # attention, through the projection (largest absolute row sum of W_proj)
        with torch.no_grad():
            got, original = layer(x).double(), attn(x).double()
        proj_norm = attn.proj.weight.detach().double().abs().sum(1).max()
        assert (got - original).abs().max() <= proj_norm * bound.max()


@pytest.mark.parametrize("center", ["channels", "tokens"])
def test_far_from_softmax_for_large_logits(center):
    """The comparison above can fail: with large logits the error breaks the small-logit case's bound."""
    taylor, softmax, _, m, _, _, _, _ = _softmax_case(qk_scale=6.0, center=center)
    assert m > 3, f"max |s·q·k̂| = {m}: logits not large"
    small_case_bound = _softmax_case(qk_scale=0.3, center=center)[4].max()
    error = (taylor - softmax).abs().max()
    assert error > 10 * small_case_bound
    assert error > 0.1 * softmax.abs().max()


def test_denominator_guard_keeps_sign_and_finiteness():
    s = 1 / math.sqrt(2)
    k = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)  # already centred; k_sum = (2, −2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    # denominators 2 + 2s(q0 − q1): row 0 → 0 (guarded), row 1 → −2 (negative, left alone)
    q = torch.tensor([[0.0, 1 / s], [0.0, 2 / s]], dtype=torch.float64)
    out = taylor_attention(q, k, v, s, "channels")
    assert torch.isfinite(out).all()
    numerator = v.sum(0) + (q * s) @ (k.T @ v)
    torch.testing.assert_close(out[1], numerator[1] / -2.0)
    torch.testing.assert_close(out[0], numerator[0] / (DENOMINATOR_EPS * 2))


def test_low_precision_input_is_computed_in_float32():
    attn = _attention()
    x = _tokens()
    q, k, v = _heads64(attn, x)
    half = taylor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1 / math.sqrt(32), "channels")
    assert half.dtype == torch.bfloat16
    full = taylor_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), 1 / math.sqrt(32),
                            "channels")
    torch.testing.assert_close(half.double(), full, rtol=1e-2, atol=1e-2)


def test_shares_weights_and_keeps_state_dict_keys():
    attn = _attention()
    layer = TaylorAttention.from_attention(attn, sparse_threshold=0.002)
    assert layer.qkv is attn.qkv and layer.proj is attn.proj
    assert layer.q_norm is attn.q_norm and layer.k_norm is attn.k_norm and layer.attn_drop is attn.attn_drop
    assert layer.state_dict().keys() == attn.state_dict().keys()
    with pytest.raises(NotImplementedError):
        layer(_tokens(), attn_mask=torch.zeros(TOKENS, TOKENS))
    with pytest.raises(ValueError, match="center"):
        TaylorAttention.from_attention(attn, center="rows")


def test_fake_quantize_has_15_levels_and_identity_gradient():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = fake_quantize(x)
    step = x.detach().abs().max() / 7
    assert y.detach().unique().numel() <= 15
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    y.mul(torch.arange(1000.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(1000.0))


def test_sparse_branch_only_in_train_and_gone_after_to_deploy():
    attn = _attention(qk_scale=4.0)
    # centring over tokens keeps the denominator at n, so the difference below has no cancellation error
    layer = TaylorAttention.from_attention(attn, center="tokens", sparse_threshold=0.002)
    x = _tokens()
    with torch.no_grad():
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
        q, k, v = layer.qkv_heads(x)
        sparse = sparse_attention(q, k, v, layer.scale, 0.002).transpose(1, 2).reshape(x.shape)
    assert (trained - evaluated).abs().max() > 1e-3
    torch.testing.assert_close(trained - evaluated, sparse @ attn.proj.weight.T, rtol=1e-4, atol=1e-5)

    deployed = layer.to_deploy()
    assert isinstance(deployed, TaylorAttention) and deployed.sparse_threshold is None
    assert deployed.qkv is attn.qkv and layer.sparse_threshold == 0.002
    with torch.no_grad():
        torch.testing.assert_close(deployed.train()(x), evaluated)


def test_sparse_branch_drops_small_probabilities():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, TOKENS, 16, generator=gen) * 3 for _ in range(3))
    probs = fake_quantize(q @ k.transpose(-2, -1) / 4).softmax(-1)
    assert ((probs > 0) & (probs <= 0.01)).any(), "no probability to drop: the threshold would go untested"
    torch.testing.assert_close(sparse_attention(q, k, v, 0.25, 0.01), (probs * (probs > 0.01)) @ v)


def test_gradients_flow_through_the_fake_quantiser_to_qkv():
    attn = _attention(qk_scale=4.0)
    x = _tokens()
    layer = TaylorAttention.from_attention(attn, sparse_threshold=0.002).train()
    layer(x).square().sum().backward()
    with_sparse = attn.qkv.weight.grad.clone()
    attn.qkv.weight.grad = None
    layer.to_deploy().train()(x).square().sum().backward()
    without = attn.qkv.weight.grad.clone()
    assert torch.isfinite(with_sparse).all()
    # the sparse branch reaches the query and key rows only through round() in the quantiser: without the
    # straight-through estimator its contribution there would be exactly zero
    contribution = (with_sparse - without)[: 2 * DIM]
    assert contribution[:DIM].abs().max() > 1e-4 and contribution[DIM:].abs().max() > 1e-4
