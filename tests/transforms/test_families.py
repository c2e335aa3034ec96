"""Role and relative-depth selectors on timm families beyond the ViT: the shipped linear-only recipes (svd,
shift_mlp, fast) convert shallow random-init copies of each, and the ONNX export matches torch."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vitcompress.api import apply_recipe
from vitcompress.deploy.runtime import open_session
from vitcompress.errors import TargetError
from vitcompress.export import export_onnx
from vitcompress.layers.lowrank_linear import LowRankLinear
from vitcompress.layers.shift_linear import ShiftLinear
from vitcompress.recipe import load_recipe
from vitcompress.transforms.select import family_of, model_blocks, select_modules

# Shallow, narrow copies: each converts in under a second and exports in 3-5 s on 2 cores (the SVD of a wide
# layer's weight, in float64, is what costs: keep them narrow).
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(depth=2, img_size=64, embed_dim=64, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 1, 2, 4),
                                                  img_size=64, window_size=4)),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2, img_size=56, embed_dim=64, num_heads=2)),
    "beit": ("beit_base_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=64)),
}
INPUT = {"deit": 64, "swin": 64, "pvt_v2": 64, "eva02": 56, "beit": 64}
#: (fc1 role names, qkv role names) relative to a block, per family
ROLE_NAMES = {
    "deit": ("mlp.fc1", "attn.qkv"), "swin": ("mlp.fc1", "attn.qkv"), "pvt_v2": ("mlp.fc1", "attn.q attn.kv"),
    "eva02": ("mlp.fc1", "attn.qkv"), "beit": ("mlp.fc1", "attn.qkv"),
}
BLOCKS = {"deit": 2, "swin": 5, "pvt_v2": 4, "eva02": 2, "beit": 2}


def build(family: str) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    for _, module in model.named_modules():  # BEiT and EVA initialise their q/v biases to zero: make them count
        for attr in ("q_bias", "v_bias"):
            if isinstance(getattr(module, attr, None), torch.nn.Parameter):
                torch.nn.init.normal_(getattr(module, attr), std=0.5)
    return model


def images(family: str, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, INPUT[family], INPUT[family], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_select_each_familys_linears(family):
    model = build(family)
    blocks = model_blocks(model)
    assert len(blocks) == BLOCKS[family]
    fc1, qkv = ROLE_NAMES[family]
    for role, leaves in (("mlp.fc1", fc1), ("attn.qkv", qkv)):
        got = [n for n, _ in select_modules(model, [f"role:{role}"], [], (torch.nn.Linear,), "test")]
        assert got == [f"{b}.{leaf}" for b in blocks for leaf in leaves.split()], family_of(model).name
    last = [n for n, _ in select_modules(model, ["role:mlp.fc2[-1]"], [], (torch.nn.Linear,), "test")]
    assert last == [f"{blocks[-1]}.mlp.fc2"]


@pytest.mark.parametrize("family, recipe", [
    *((f, r) for f in FAMILIES for r in ("svd", "shift_mlp")), ("eva02", "fast"), ("beit", "fast"),
])
def test_shipped_linear_recipes_convert_every_family(family, recipe, tmp_path):
    """The shipped recipes as they are (role selectors) on each family, exported with ONNX parity (``fast`` in torch
    only: the same layers as svd); ``fast`` whitens every qkv, which BEiT and EVA apply with F.linear and their own
    q/v bias: calibration must reach it and the conversion take effect."""
    model = build(family)
    loaded = load_recipe(recipe)
    x = images(family)
    with torch.no_grad():
        before = model(x)
    converted = apply_recipe(model, loaded, calibration=x)
    kinds = (LowRankLinear,) if recipe in ("svd", "fast") else (ShiftLinear,)
    per_block = 4 if recipe == "fast" else 2
    fused = 2 if family == "pvt_v2" and recipe == "fast" else 1  # q and kv
    assert len(converted[0]) == len(model_blocks(model)) * (per_block + fused - 1)
    assert all(isinstance(model.get_submodule(name), kinds) for name in converted[0])
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after), "the conversion changed nothing: a replaced Linear is bypassed"
    if recipe == "fast":
        return
    path = export_onnx(model, tmp_path / "model.onnx", input_size=tuple(x.shape[1:]))
    got = open_session(path, threads=2).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - after.numpy()).max() <= loaded.validate_.max_abs_diff


@pytest.mark.parametrize("family", ["eva02", "beit"])
def test_qv_bias_folded_into_qkv_keeps_the_function(family):
    """BEiT/EVA's q/v bias moves into the fused qkv Linear when a linear transform selects it: same outputs."""
    from vitcompress.transforms.select import select_linears

    model = build(family)
    x = images(family, 2)
    with torch.no_grad():
        before = model(x)
    select_linears(model, ["role:attn.qkv"], [], "test")
    attn = model.blocks[0].attn
    assert attn.q_bias is None and attn.qkv.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_calibration_that_never_reaches_a_linear_is_an_error_naming_it(reference_model):
    """A whitened Linear whose forward never runs (here: a head-less model never calls ``head``) fails with the
    Linear's name, not a bare ValueError from the factorisation."""
    import copy

    from vitcompress.recipe import parse_recipe

    model = copy.deepcopy(reference_model)
    model.forward = model.forward_features  # the head is never called
    recipe = parse_recipe({"steps": [{"transform": "svd_lowrank", "targets": ["role:mlp.fc1[-1]", "head"],
                                      "rank": 4, "whitening": "cholesky"}]}, "test.yaml")
    with pytest.raises(TargetError, match=r"svd_lowrank: whitening 'cholesky' needs the inputs of head, but "
                                          "calibration never reached it"):
        apply_recipe(model, recipe, calibration=torch.randn(4, 1, 28, 28))
    assert isinstance(model.blocks[11].mlp.fc1, torch.nn.Linear), "nothing converted before the error"


@pytest.mark.parametrize("name, fc1, qkv, blocks", [
    ("mvitv2_tiny", "mlp.fc1", "attn.qkv", 10),
    ("eva02_base_patch14_224", "mlp.fc1_g mlp.fc1_x", "attn.q_proj attn.k_proj attn.v_proj", 12),  # SwiGLU, q/k/v
    ("cait_xxs24_224", "mlp.fc1", "attn.qkv", 24),  # the class-attention blocks_token_only are not blocks
    ("swinv2_tiny_window8_256", "mlp.fc1", "attn.qkv", 12),
])
def test_role_tables_of_families_too_large_to_convert_here(name, fc1, qkv, blocks):
    """Built on the meta device (no memory, no weights): the roles name each family's Linears in every block."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    found = model_blocks(model)
    assert len(found) == blocks
    for role, leaves in (("mlp.fc1", fc1), ("attn.qkv", qkv)):
        got = [n for n, _ in select_modules(model, [f"role:{role}"], [], (torch.nn.Linear,), "test")]
        assert got == [f"{b}.{leaf}" for b in found for leaf in leaves.split()]
