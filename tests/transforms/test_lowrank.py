import copy

import pytest
import torch

from tests.conftest import assert_onnxruntime_matches_torch
from vitcompress.api import apply_recipe
from vitcompress.errors import DataError, TargetError
from vitcompress.export import export_onnx
from vitcompress.layers.lowrank_linear import LowRankLinear
from vitcompress.recipe import parse_recipe


def recipe(**step):
    return parse_recipe({"steps": [{"transform": "svd_lowrank", **step}]}, "test.yaml")


def calibration(shape, n=2, batch=8):
    gen = torch.Generator().manual_seed(0)
    return lambda: (torch.randn(batch, *shape, generator=gen) for _ in range(n))


def test_rank_ratio_converts_every_target(reference_model):
    model = copy.deepcopy(reference_model)
    converted = apply_recipe(model, recipe(targets=["blocks.*.mlp.fc1"], rank_ratio=0.25))
    assert len(converted[0]) == 12
    assert isinstance(model.blocks[3].mlp.fc1, LowRankLinear) and model.blocks[3].mlp.fc1.rank == 48
    assert isinstance(model.blocks[3].mlp.fc2, torch.nn.Linear)


def test_energy_picks_smallest_rank_keeping_that_energy(reference_model):
    model = copy.deepcopy(reference_model)
    linear = model.blocks[0].mlp.fc2
    sigma2 = torch.linalg.svdvals(linear.weight.detach().double()) ** 2
    kept = torch.cumsum(sigma2, 0) / sigma2.sum()
    expected = int((kept < 0.5).sum()) + 1
    apply_recipe(model, recipe(targets=["blocks.0.mlp.fc2"], energy=0.5))
    assert model.blocks[0].mlp.fc2.rank == expected
    assert kept[expected - 1] >= 0.5 > kept[expected - 2]


def test_refuses_factorisation_that_is_not_cheaper(reference_model):
    model = copy.deepcopy(reference_model)
    # fc1 is 768×192: rank 154·(192+768) ≥ 192·768, rank 153 is the largest cheaper one
    with pytest.raises(TargetError, match=r"not cheaper .* use rank ≤ 153"):
        apply_recipe(model, recipe(targets=["blocks.0.mlp.fc1"], rank=154))
    assert isinstance(model.blocks[0].mlp.fc1, torch.nn.Linear), "a refused step must not half-convert the model"
    with pytest.raises(TargetError, match="exceeds min"):
        apply_recipe(model, recipe(targets=["blocks.0.mlp.fc1"], rank=500))


@pytest.mark.parametrize("whitening", ["pca", "cholesky"])
def test_whitening_uses_calibration_and_reduces_output_error(reference_model, whitening):
    torch.manual_seed(0)
    images = torch.randn(16, 1, 28, 28)
    plain, whitened = copy.deepcopy(reference_model), copy.deepcopy(reference_model)
    apply_recipe(plain, recipe(targets=["blocks.5.mlp.fc1"], rank=24))
    apply_recipe(whitened, recipe(targets=["blocks.5.mlp.fc1"], rank=24, whitening=whitening),
                 calibration=lambda: iter([images[:8], images[8:]]))
    features = {}
    hook = reference_model.blocks[5].mlp.fc1.register_forward_hook(lambda m, a, o: features.update(ref=o, x=a[0]))
    with torch.no_grad():
        reference_model(images)
        hook.remove()
        err_plain = (plain.blocks[5].mlp.fc1(features["x"]) - features["ref"]).norm()
        err_white = (whitened.blocks[5].mlp.fc1(features["x"]) - features["ref"]).norm()
    assert err_white < err_plain


def test_whitening_without_calibration_data_is_an_error(reference_model):
    with pytest.raises(DataError, match="calibration"):
        apply_recipe(copy.deepcopy(reference_model), recipe(targets=["blocks.0.mlp.fc1"], rank=8, whitening="pca"))


@pytest.mark.export
@pytest.mark.parametrize("fixture", ["reference_model", "deit_tiny"])
def test_torch_onnxruntime_parity(request, tmp_path, fixture):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    input_size = tuple(model.pretrained_cfg["input_size"])
    apply_recipe(model, recipe(targets=[r"re:blocks\.\d+\.mlp\.fc[12]"], rank_ratio=0.25, whitening="cholesky"),
                 calibration=calibration(input_size))
    assert_onnxruntime_matches_torch(model, export_onnx(model, tmp_path / "m.onnx", input_size=input_size), input_size)


@pytest.mark.parametrize("width", [300, 384, 1000])
def test_gram_by_upper_triangle_blocks_equals_the_float64_product(width):
    """add_gram's block products of the upper triangle, summed over batches, are XᵀX in float64 (the same sums
    in another order: equal to rounding), mirrored into a symmetric matrix."""
    from vitcompress.transforms.lowrank import add_gram, symmetric

    gen = torch.Generator().manual_seed(0)
    batches = [torch.nn.functional.gelu(torch.randn(1024, width, generator=gen)) for _ in range(2)]
    total = torch.zeros(width, width, dtype=torch.float64)
    for x in batches:
        add_gram(total, x)
    x64 = torch.cat(batches).double()
    gram = symmetric(total)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, x64.T @ x64, rtol=1e-12, atol=1e-9)


def test_whitening_a_rank_deficient_gram_still_factors(reference_model):
    """Fewer calibration tokens than fc2's inputs: the Gram matrix is singular up to rounding, and the Cholesky
    whitening relies on its jitter being above that rounding (float64 products)."""
    model = copy.deepcopy(reference_model)
    apply_recipe(model, recipe(targets=["blocks.0.mlp.fc2"], rank_ratio=0.125, whitening="cholesky"),
                 calibration=calibration((1, 28, 28), n=1, batch=4))
    assert isinstance(model.blocks[0].mlp.fc2, LowRankLinear)
