import copy

import numpy as np
import onnx
import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

import vitcompress
from vitcompress.api import apply_recipe
from vitcompress.deploy.runtime import open_session
from vitcompress.errors import RecipeError, TargetError
from vitcompress.export import export_onnx
from vitcompress.layers.skip import SkippedBlock
from vitcompress.layers.token_merge import ToMeBlock, ToMeBlocks
from vitcompress.recipe import parse_recipe
from vitcompress.transforms.token_merge import TokenMergeConfig


def recipe(**step):
    return parse_recipe({"steps": [{"transform": "token_merge", **step}]}, "test.yaml")


def tome_copy(model: nn.Module, **step) -> nn.Module:
    model = copy.deepcopy(model)
    vitcompress.apply(model, TokenMergeConfig(**step))
    return model


@pytest.fixture(scope="module")
def small_vit() -> VisionTransformer:
    """A small timm ViT (65 tokens, 4 blocks, width 64), seeded random weights: exports in seconds."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=2,
                             init_values=0.1).eval()


def test_merges_in_every_block_keeping_the_state_dict(reference_model):
    model = copy.deepcopy(reference_model)
    keys = list(model.state_dict())
    converted = apply_recipe(model, recipe(r=3))
    assert converted == [[f"blocks.{i}" for i in range(12)]]
    assert isinstance(model.blocks, ToMeBlocks) and all(b.r == 3 for b in model.blocks)
    assert list(model.state_dict()) == keys, "a checkpoint of the original must still load"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert tokens.shape == (2, 50 - 12 * 3, 192)


def test_per_block_r_and_blocks_after_the_first_target_get_proportional_attention(reference_model):
    model = copy.deepcopy(reference_model)
    converted = apply_recipe(model, recipe(targets=["blocks.2", "blocks.5"], r=[4, 0]))
    assert converted == [["blocks.2", "blocks.5"]]
    assert all(type(model.blocks[i]) is Block for i in range(2))
    assert [model.blocks[i].r for i in range(2, 12)] == [4, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape[1] == 46


def test_r_zero_everywhere_is_the_original_model(reference_model):
    model = tome_copy(reference_model, r=0)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference_model(x))


def test_merging_changes_the_output_within_reason(reference_model):
    model = tome_copy(reference_model, r=2)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(x), reference_model(x)
    assert 0 < (got - want).abs().max() < 0.5 * want.abs().max()


def _parity(model: nn.Module, path, input_size) -> None:
    session = open_session(path, threads=2)
    for batch in (1, 3):
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4, f"batch {batch}"
        assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.export
def test_torch_onnxruntime_parity_with_dynamic_batch(small_vit, tmp_path):
    model = tome_copy(small_vit, r=[8, 8, 8, 100])
    path = export_onnx(model, tmp_path / "tome.onnx", input_size=(3, 32, 32))
    _parity(model, path, (3, 32, 32))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"TopK", "GatherElements", "ScatterElements"} <= ops and not any("vitcompress" in op for op in ops)


@pytest.mark.export
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["reference_model", "deit_tiny"])
def test_torch_onnxruntime_parity_on_vit_fmnist_and_deit(request, tmp_path, fixture):
    model = tome_copy(request.getfixturevalue(fixture), r=4)
    input_size = tuple(model.pretrained_cfg["input_size"])
    _parity(model, export_onnx(model, tmp_path / "tome.onnx", input_size=input_size), input_size)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: timm.create_model("test_vit", pretrained=False, global_pool="avg"),
         "global_pool 'avg' is not supported, only 'token'.*token sizes as weights"),
        (lambda: timm.create_model("test_vit", pretrained=False, global_pool="map"),
         "the head pools with attention \\(AttentionPoolLatent\\)"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "needs a timm VisionTransformer.*got Sequential"),
        (lambda: timm.create_model("test_vit", pretrained=False, reg_tokens=2),
         "exactly one prefix token.*3 prefix tokens"),
    ],
    ids=["avg_pool", "attention_pool", "not_timm", "register_tokens"],
)
def test_unsupported_architecture_is_a_clear_error(make, message):
    model = make()
    with pytest.raises(TargetError, match=message):
        vitcompress.apply(model, TokenMergeConfig(r=1))


def test_r_list_of_the_wrong_length_is_an_error(reference_model):
    model = copy.deepcopy(reference_model)
    with pytest.raises(TargetError, match=r"r has 2 values but the targets select 12 blocks"):
        vitcompress.apply(model, TokenMergeConfig(r=[1, 2]))
    assert not any(isinstance(b, ToMeBlock) for b in model.blocks), "a failed step left the model changed"


def test_a_later_block_whose_attention_was_removed_passes_tokens_only(reference_model):
    model = copy.deepcopy(reference_model)
    vitcompress.apply(model, [vitcompress.SkipConfig(blocks=[6]), TokenMergeConfig(targets=["blocks.0"], r=5)])
    assert isinstance(model.blocks[6], SkippedBlock) and model.blocks[7].r == 0
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape[1] == 45


def test_a_later_block_with_another_attention_is_an_error(reference_model):
    model = copy.deepcopy(reference_model)
    vitcompress.apply(model, vitcompress.TaylorConfig(targets=["blocks.9.attn"]))
    with pytest.raises(TargetError, match="blocks.9 is a Block with TaylorAttention.*follows a merging block"):
        vitcompress.apply(model, TokenMergeConfig(targets=["blocks.0"], r=1))


@pytest.mark.parametrize(
    ("step", "where"),
    [({"r": -1}, "steps.0.r"), ({"r": [1, -2]}, "steps.0.r"), ({}, "steps.0.r"), ({"r": 1, "rr": 2}, "steps.0.rr")],
)
def test_recipe_errors_name_the_key(step, where):
    with pytest.raises(RecipeError, match=f"test.yaml: {where}"):
        recipe(**step)


def test_selector_matching_nothing_is_an_error(reference_model):
    with pytest.raises(TargetError, match="matches no module"):
        vitcompress.apply(copy.deepcopy(reference_model), TokenMergeConfig(targets=["blocks.99"], r=1))


def test_final_token_distillation_is_refused_since_the_token_count_changes():
    data = {"steps": [{"transform": "token_merge", "r": 2}], "finetune": {"distill": {"tokens_mse": 0.5}}}
    with pytest.raises(RecipeError, match="test.yaml: finetune.distill.tokens_mse: token_merge changes the number"):
        parse_recipe(data, "test.yaml")
    data["finetune"]["distill"]["tokens_mse"] = 0.0
    assert parse_recipe(data, "test.yaml").finetune.distill.tokens_mse == 0
