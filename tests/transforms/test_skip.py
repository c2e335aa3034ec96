import copy
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from tests.conftest import assert_onnxruntime_matches_torch
from vitcompress.api import apply_recipe
from vitcompress.errors import RecipeError, TargetError
from vitcompress.export import export_onnx
from vitcompress.layers.skip import SkippedBlock
from vitcompress.recipe import load_recipe, parse_recipe
from vitcompress.transforms.skip import cka_scores

RECIPES = Path(__file__).parent.parent.parent / "recipes"


def recipe(**step):
    return parse_recipe({"steps": [{"transform": "attention_skip", **step}]}, "test.yaml")


def calibration(shape=(1, 28, 28), n=2, batch=8):
    x = torch.randn(n * batch, *shape, generator=torch.Generator().manual_seed(0))
    return lambda: iter(x.split(batch))


@pytest.fixture(scope="module")
def tiny_vit():
    """A 3-block ViT on 28×28 images: cheap to export, for the latency-budget search."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                              num_heads=2)
    model.pretrained_cfg = {"input_size": (1, 28, 28)}
    return model.eval()


def test_explicit_blocks(reference_model):
    model = copy.deepcopy(reference_model)
    assert apply_recipe(model, recipe(blocks=[3, 7])) == [["blocks.3", "blocks.7"]]
    assert [isinstance(b, SkippedBlock) for b in model.blocks].count(True) == 2
    assert isinstance(model.blocks[3], SkippedBlock) and isinstance(model.blocks[4], Block)


def test_cka_count_is_greedy_and_rescored(test_vit):
    model = copy.deepcopy(test_vit)
    (chosen,) = apply_recipe(model, recipe(select="cka", count=3, ignore=["blocks.0"]), calibration((3, 160, 160)))
    assert len(chosen) == 3 and "blocks.0" not in chosen
    # replay the greedy choice independently: argmax of fresh scores, skip it, score again
    replay = copy.deepcopy(test_vit)
    remaining = {f"blocks.{i}": replay.blocks[i] for i in range(1, len(replay.blocks))}
    expected = []
    for _ in range(3):
        scores = cka_scores(replay, list(remaining.items()), calibration((3, 160, 160))())
        best = max(scores, key=scores.get)
        replay.blocks[int(best.split(".")[1])] = SkippedBlock.from_block(remaining.pop(best))
        expected.append(best)
    assert chosen == expected
    x = next(calibration((3, 160, 160))())
    with torch.no_grad():
        torch.testing.assert_close(model(x), replay(x))


def test_rescoring_changes_the_scores(reference_model):
    model = copy.deepcopy(reference_model)
    from vitcompress.transforms.registry import TransformInputs
    from vitcompress.transforms.skip import apply_skip

    inputs = TransformInputs(calibration_batches=calibration())
    apply_skip(model, recipe(select="cka", count=2).steps[0], inputs)
    first, second = inputs.details["rounds"]
    assert inputs.details["skipped"] == [first["chosen"], second["chosen"]]
    assert first["chosen"] not in second["cka"] and len(second["cka"]) == 11
    assert all(0 <= s <= 1 for s in first["cka"].values())
    assert any(abs(second["cka"][b] - first["cka"][b]) > 1e-6 for b in second["cka"]), "scores were not recomputed"


@pytest.mark.parametrize(("step", "message"), [
    ({"blocks": [1], "select": "cka", "count": 1}, "exactly one of blocks, select"),
    ({}, "exactly one of blocks, select"),
    ({"select": "cka"}, "needs exactly one of count, latency_budget_ms"),
    ({"select": "cka", "count": 2, "latency_budget_ms": 5}, "needs exactly one of count, latency_budget_ms"),
    ({"blocks": [1], "count": 2}, "go with select"),
    ({"blocks": [1, 1]}, "distinct indices"),
    ({"select": "similarity", "count": 1}, "steps.0.select"),
    ({"select": "cka", "count": 0}, "steps.0.count"),
    ({"select": "cka", "latency_budget_ms": -1}, "steps.0.latency_budget_ms"),
    ({"blocks": [1], "block": [2]}, "steps.0.block: unknown key"),
])
def test_recipe_errors(step, message):
    with pytest.raises(RecipeError, match=message):
        recipe(**step)


def test_bad_targets_leave_the_model_untouched(reference_model):
    model = copy.deepcopy(reference_model)
    with pytest.raises(TargetError, match="blocks.12 is not among the target blocks"):
        apply_recipe(model, recipe(blocks=[2, 12]))
    with pytest.raises(TargetError, match="blocks.0 is not among the target blocks"):
        apply_recipe(model, recipe(blocks=[0], ignore=["blocks.0"]))
    with pytest.raises(TargetError, match="count 3 exceeds the 2 target blocks"):
        apply_recipe(model, recipe(select="cka", count=3, targets=["blocks.1", "blocks.2"]), calibration())
    with pytest.raises(TargetError, match="matches no module"):
        apply_recipe(model, recipe(blocks=[1], targets=["layers.*"]))
    assert not any(isinstance(m, SkippedBlock) for m in model.modules())


def test_skipped_blocks_are_not_targets_again(reference_model):
    model = copy.deepcopy(reference_model)
    apply_recipe(model, recipe(blocks=[1]))
    with pytest.raises(TargetError, match="blocks.1 is not among"):
        apply_recipe(model, recipe(blocks=[1]))


def test_shipped_skip_recipes(reference_model):
    model = copy.deepcopy(reference_model)
    explicit = load_recipe(RECIPES / "skip.yaml")
    assert apply_recipe(model, explicit) == [["blocks.2", "blocks.4"]]
    cka = load_recipe(RECIPES / "skip_cka.yaml")
    assert cka.steps[0].select == "cka" and cka.steps[0].count == 4 and cka.finetune is not None
    model = copy.deepcopy(reference_model)
    (chosen,) = apply_recipe(model, cka, calibration())
    assert len(chosen) == 4 and all(isinstance(model.get_submodule(name), SkippedBlock) for name in chosen)


@pytest.mark.export
def test_latency_budget(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    assert apply_recipe(model, recipe(select="cka", latency_budget_ms=1e6, latency_runs=3), calibration()) == [[]]
    with pytest.raises(TargetError, match=r"latency budget 1e-06 ms not met even with every target block skipped"):
        apply_recipe(model, recipe(select="cka", latency_budget_ms=1e-6, latency_runs=3, targets=["blocks.1"]),
                     calibration())
    assert not any(isinstance(m, SkippedBlock) for m in model.modules()), "a failed search must not half-convert"


@pytest.mark.export
@pytest.mark.parametrize("fixture", ["reference_model", "deit_tiny"])
def test_torch_onnxruntime_parity_and_no_attention_ops(request, tmp_path, fixture):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    input_size = tuple(model.pretrained_cfg["input_size"])
    apply_recipe(model, recipe(blocks=[0, 5, 11]))
    path = export_onnx(model, tmp_path / "m.onnx", input_size=input_size)
    assert_onnxruntime_matches_torch(model, path, input_size)
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["LayerNormalization"] == 2 * 12 + 1 - 3, "norm1 of the skipped blocks must be gone"
    assert ops["Softmax"] == 12 - 3, "the skipped blocks' attention must be gone"
