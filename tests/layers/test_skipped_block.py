import copy

import torch

from vitcompress.api import apply_recipe
from vitcompress.layers.skip import SkippedBlock
from vitcompress.recipe import parse_recipe


def skip(blocks, **extra):
    return parse_recipe({"steps": [{"transform": "attention_skip", "blocks": blocks, **extra}]}, "test.yaml")


def images(n=4):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def test_empty_skip_set_is_the_original_exactly(reference_model):
    model = copy.deepcopy(reference_model)
    assert apply_recipe(model, skip([])) == [[]]
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference_model(images()), rtol=0, atol=0)


def test_skipping_a_block_equals_zeroing_its_attention_output(reference_model):
    for blocks in ([0], [5, 11], [1, 2, 3]):
        model = copy.deepcopy(reference_model)
        apply_recipe(model, skip(blocks))
        zeroed = copy.deepcopy(reference_model)
        for j in blocks:
            zeroed.blocks[j].attn.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
        with torch.no_grad():
            torch.testing.assert_close(model(images()), zeroed(images()), rtol=0, atol=0)
            assert not torch.equal(model(images()), reference_model(images()))


def test_skipped_block_keeps_only_the_mlp_branch(reference_model):
    model = copy.deepcopy(reference_model)
    mlp = model.blocks[4].mlp
    apply_recipe(model, skip([4]))
    block = model.blocks[4]
    assert isinstance(block, SkippedBlock) and block.mlp is mlp
    keys = set(model.state_dict()) ^ set(reference_model.state_dict())
    assert keys and all(k.startswith(("blocks.4.norm1", "blocks.4.attn")) for k in keys)
    assert {k for k in model.state_dict() if k.startswith("blocks.4.")} == {
        k for k in reference_model.state_dict() if k.startswith(("blocks.4.norm2", "blocks.4.mlp"))}
