import pytest
import torch

from vitcompress.cka import CKAStats, linear_cka


def data(n=200, p=24, q=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    y = x[:, :q] @ torch.randn(q, q, generator=gen, dtype=torch.float64) + torch.randn(n, q, generator=gen,
                                                                                       dtype=torch.float64)
    return x, y


def orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def gram_cka(x, y):
    """The direct HSIC form with n×n Gram matrices: tr(KHLH) / sqrt(tr(KHKH)·tr(LHLH)), K = XXᵀ, L = YYᵀ."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T
    return float(torch.trace(k @ h @ l @ h) / torch.sqrt(torch.trace(k @ h @ k @ h) * torch.trace(l @ h @ l @ h)))


def test_matches_the_direct_gram_formula_on_random_data():
    for seed in range(3):
        x, y = data(seed=seed)
        assert linear_cka(x, y) == pytest.approx(gram_cka(x, y), rel=1e-10)
    x, y = data()
    assert 0.05 < linear_cka(x, y) < 0.95, "the check would be weak at the ends of the range"


def test_one_for_identical_inputs_and_symmetric():
    x, y = data()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = data()
    reference = linear_cka(x, y)
    assert linear_cka(x @ orthogonal(24, 1), y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, y @ orthogonal(16, 2)) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x + 3.0, y - 2.0) == pytest.approx(reference, rel=1e-10), "centring removes offsets"
    scaled = x * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    assert abs(linear_cka(scaled, y) - reference) > 1e-3, "not invariant to anisotropic scaling"


def test_batches_and_token_axes_sum_to_the_same_value():
    x, y = data(n=240)
    stats = CKAStats()
    for i in range(0, 240, 60):  # (batch, tokens, features) chunks
        stats.update(x[i:i + 60].reshape(6, 10, 24).float(), y[i:i + 60].reshape(6, 10, 16).float())
    assert stats.value() == pytest.approx(linear_cka(x, y), rel=1e-5)


def test_constant_input_scores_zero_and_bad_shapes_fail():
    x, _ = data()
    assert linear_cka(x, torch.ones(200, 4)) == 0.0
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, torch.ones(199, 4))
