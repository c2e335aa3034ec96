import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from timm.models.vision_transformer import Attention

from tests.conftest import FAST, assert_onnxruntime_matches_torch
from vitcompress.api import apply_recipe
from vitcompress.errors import RecipeError, TargetError
from vitcompress.export import export_onnx, to_deploy
from vitcompress.layers.taylor_attention import TaylorAttention
from vitcompress.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).parent.parent.parent / "recipes"


def recipe(**step):
    return parse_recipe({"steps": [{"transform": "taylor_attention", **step}]}, "test.yaml")


def test_converts_every_attention_sharing_weights(reference_model):
    model = copy.deepcopy(reference_model)
    keys, qkv = model.state_dict().keys(), model.blocks[3].attn.qkv
    converted = apply_recipe(model, recipe(targets=["blocks.*.attn"], ignore=["blocks.11.attn"], center="tokens"))
    assert converted == [[f"blocks.{i}.attn" for i in range(11)]]
    layer = model.blocks[3].attn
    assert isinstance(layer, TaylorAttention) and layer.center == "tokens" and layer.sparse_threshold is None
    assert isinstance(model.blocks[11].attn, Attention)
    assert model.state_dict().keys() == keys, "a checkpoint of the original must still load"
    assert layer.qkv is qkv, "the layer shares the attention's modules, it does not copy them"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_sparse_branch_setting_reaches_the_layers_and_export_removes_it(reference_model):
    model = copy.deepcopy(reference_model)
    apply_recipe(model, recipe(targets=["blocks.0.attn"], sparse_branch={"enabled": True, "threshold": 0.01}))
    assert model.blocks[0].attn.sparse_threshold == 0.01
    assert to_deploy(model) is not model and model.blocks[0].attn.sparse_threshold == 0.01, "not in place"
    to_deploy(model, inplace=True)
    assert isinstance(model.blocks[0].attn, TaylorAttention) and model.blocks[0].attn.sparse_threshold is None


@pytest.mark.parametrize(
    ("step", "where"),
    [
        ({"center": "rows"}, "steps.0.center"),
        ({"sparse_branch": {"enabled": True, "threshold": 1.5}}, "steps.0.sparse_branch.threshold"),
        ({"sparse_branch": {"enabled": True, "tau": 0.1}}, "steps.0.sparse_branch.tau: unknown key"),
        ({"centre": "tokens"}, "steps.0.centre: unknown key"),
    ],
)
def test_recipe_errors_name_the_key(step, where):
    with pytest.raises(RecipeError, match=f"test.yaml: {where}"):
        recipe(targets=["blocks.*.attn"], **step)


def test_target_that_is_not_attention_is_an_error(reference_model):
    model = copy.deepcopy(reference_model)
    with pytest.raises(TargetError, match=r"blocks\.0\.mlp\.fc1 \(Linear\), not a Attention"):
        apply_recipe(model, recipe(targets=["blocks.0.mlp.fc1"]))
    with pytest.raises(TargetError, match="matches no module"):
        apply_recipe(model, recipe(targets=["blocks.*.attention"]))
    assert not any(isinstance(m, TaylorAttention) for m in model.modules())


def test_default_centring_is_over_tokens():
    (step,) = recipe(targets=["blocks.*.attn"]).steps
    assert step.center == "tokens" and not step.sparse_branch.enabled


def _convert(tmp_path, *args):
    from click.testing import CliRunner

    from vitcompress.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["convert", *args, "--out", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


@pytest.mark.slow
def test_taylor_recipe_converts_the_reference_model(tmp_path):
    finetuned = load_recipe(RECIPES / "taylor.yaml")
    assert finetuned.model == "vit_fmnist" and finetuned.finetune is not None
    overrides = [x for item in (*FAST, "validate.max_top1_drop=null", "validate.min_agreement=null")
                 for x in ("--set", item)]
    report, out = _convert(tmp_path, "--recipe", RECIPES / "taylor.yaml", *overrides)
    assert report["steps"][0]["modules"] == [f"blocks.{i}.attn" for i in range(12)]
    assert report["finetune"]["steps_done"] == 3
    converted = report["validation"]["models"]["converted"]
    assert converted["parity"]["max_abs_diff"] < 1e-3 and not report["failed_gates"]
    assert (out / "model.onnx").exists()


@pytest.mark.slow
def test_taylor_384_recipe_converts_vit_small_384(tmp_path):
    large = load_recipe(RECIPES / "taylor_384.yaml")
    assert large.model == "vit_small_patch16_384" and large.finetune is None
    report, _ = _convert(tmp_path, "--recipe", RECIPES / "taylor_384.yaml", "--random-init",
                         "--set", "validate.images=4", "--set", "validate.batch_sizes=[1]",
                         "--set", "validate.latency_runs=3", "--set", "validate.warmup_runs=1")
    assert len(report["steps"][0]["modules"]) == 12
    converted, original = report["validation"]["models"]["converted"], report["validation"]["models"]["original"]
    assert converted["macs"] < original["macs"] and converted["parity"]["max_abs_diff"] < 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each (fixture, converted?) once per module: ``(deployed torch model, ONNX path)``."""
    cache = {}

    def export(request, fixture: str, convert: bool = True, center: str = "tokens"):
        if (fixture, convert, center) not in cache:
            model = copy.deepcopy(request.getfixturevalue(fixture))
            if convert:
                apply_recipe(model, recipe(targets=["blocks.*.attn"], center=center, sparse_branch={"enabled": True}))
            path = tmp_path_factory.mktemp(fixture) / (f"taylor_{center}.onnx" if convert else "original.onnx")
            input_size = tuple(model.pretrained_cfg["input_size"])
            cache[fixture, convert, center] = (to_deploy(model), export_onnx(model, path, input_size=input_size))
        return cache[fixture, convert, center]

    return export


@pytest.mark.export
@pytest.mark.parametrize(("fixture", "center"),
                         [("reference_model", "tokens"), ("deit_tiny", "tokens"),
                          pytest.param("reference_model", "channels", marks=pytest.mark.slow)])
def test_torch_onnxruntime_parity(request, exported, fixture, center):
    model, path = exported(request, fixture, center=center)
    assert all(m.sparse_threshold is None for m in model.modules() if isinstance(m, TaylorAttention))
    assert_onnxruntime_matches_torch(model, path, tuple(model.pretrained_cfg["input_size"]))


def _token_square_tensors(path: Path, tokens: int) -> tuple[list[str], set[str]]:
    """Intermediates with two axes of size ``tokens``, and the symbolic dims left after shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    square, symbolic = [], set()
    for info in model.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        symbolic.update(d.dim_param for d in dims if not d.HasField("dim_value"))
        if sum(d.HasField("dim_value") and d.dim_value == tokens for d in dims) >= 2:
            square.append(info.name)
    return square, symbolic


@pytest.mark.export
def test_exported_graph_has_no_token_by_token_tensor(request, exported):
    tokens = 50  # 7×7 patches + cls
    _, original = exported(request, "reference_model", convert=False)
    square, _ = _token_square_tensors(original, tokens)
    assert square, "the softmax export should hold (batch, heads, 50, 50) tensors: the check would be vacuous"
    _, taylor = exported(request, "reference_model")
    square, symbolic = _token_square_tensors(taylor, tokens)
    assert symbolic == {"batch"}, f"shape inference left {symbolic} unknown: a hidden n×n tensor could slip by"
    assert not square, f"n×n intermediates in the Taylor graph: {square[:5]}"
