import pytest
import torch
from torch import nn

from vitcompress.layers.lowrank_linear import LowRankLinear


def _linear(out_features=48, in_features=32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def _correlated_inputs(n=2000, dim=32, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen) * torch.logspace(0, -2, dim)
    return torch.randn(n, dim, generator=gen) @ mixing.T


@pytest.mark.parametrize("whitening", ["none", "pca", "cholesky"])
def test_full_rank_equals_dense(whitening):
    linear = _linear()
    x = _correlated_inputs()
    gram = x.double().T @ x.double() if whitening != "none" else None
    lowrank = LowRankLinear.from_linear(linear, rank=32, whitening=whitening, gram=gram)
    torch.testing.assert_close(lowrank(x), linear(x), rtol=1e-4, atol=1e-4)


def test_truncation_error_is_the_discarded_singular_values():
    """Eckart–Young: ‖W − A·B‖_F = sqrt(Σ_{i>r} σ_i²) for the truncated SVD."""
    linear = _linear()
    sigma = torch.linalg.svdvals(linear.weight.detach().double())
    for rank in (1, 8, 20):
        lowrank = LowRankLinear.from_linear(linear, rank=rank)
        product = (lowrank.second.weight @ lowrank.first.weight).detach().double()
        error = torch.linalg.matrix_norm(linear.weight.detach().double() - product)
        expected = sigma[rank:].pow(2).sum().sqrt()
        assert abs(error.item() - expected.item()) < 1e-4 * expected.item()


def test_bias_kept_and_shapes():
    linear = _linear()
    lowrank = LowRankLinear.from_linear(linear, rank=5)
    assert lowrank.first.weight.shape == (5, 32) and lowrank.second.weight.shape == (48, 5)
    assert lowrank.first.bias is None
    torch.testing.assert_close(lowrank.second.bias, linear.bias)


def test_cholesky_whitening_minimises_output_error_on_the_data():
    """SVD-LLM's whitened truncation beats plain SVD on the activations it was fitted on, at every rank."""
    linear = _linear()
    x = _correlated_inputs()
    gram = x.double().T @ x.double()
    with torch.no_grad():
        for rank in (4, 8, 16):
            plain = (LowRankLinear.from_linear(linear, rank)(x) - linear(x)).norm()
            whitened = (LowRankLinear.from_linear(linear, rank, "cholesky", gram)(x) - linear(x)).norm()
            assert whitened < plain * 0.9


def test_cholesky_error_equals_discarded_whitened_singular_values():
    """With XᵀX = LLᵀ, ‖X Wᵀ − X W'ᵀ‖_F equals the norm of the discarded singular values of W L."""
    linear = _linear()
    x = _correlated_inputs().double()
    gram = x.T @ x
    energy = LowRankLinear.component_energy(linear, "cholesky", gram)
    rank = 10
    layer = LowRankLinear.from_linear(linear, rank, "cholesky", gram).double()
    with torch.no_grad():
        error = (layer(x) - linear.double()(x)).norm()
    assert abs(error.item() - energy[rank:].sum().sqrt().item()) < 1e-3 * error.item()


def test_pca_keeps_the_excited_subspace():
    """Inputs confined to a k-dim subspace are reproduced exactly by the rank-k PCA factorisation."""
    linear = _linear()
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(32, 6, generator=gen))[0]
    x = torch.randn(500, 6, generator=gen) @ basis.T
    layer = LowRankLinear.from_linear(linear, 6, "pca", x.double().T @ x.double())
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_whitening_needs_gram_and_rank_in_range():
    linear = _linear()
    with pytest.raises(ValueError, match="Gram"):
        LowRankLinear.from_linear(linear, 4, "cholesky")
    with pytest.raises(ValueError, match="outside"):
        LowRankLinear.from_linear(linear, 33)


def test_factorising_runs_on_one_thread_and_restores_the_count():
    from vitcompress.layers.lowrank_linear import one_thread

    threads = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError), one_thread():
        raise RuntimeError("a failed factorisation")
    assert torch.get_num_threads() == threads
