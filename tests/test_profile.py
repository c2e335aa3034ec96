"""Per-block latency attribution: the convert report's profile, `vitcompress profile`, and the node→module map."""

import copy
import json

import onnx
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import FAST
from tests.test_cli import invoke, one_error_line
from vitcompress import apply_recipe, export_onnx
from vitcompress.api import convert
from vitcompress.cli import main
from vitcompress.profile import attribute, module_of, profile_onnx
from vitcompress.recipe import parse_recipe

DEPTH = 12  # vit_fmnist


def rows_total(profile: dict) -> float:
    return sum(b["ms"] for b in profile["blocks"]) + sum(o["ms"] for o in profile["outside_blocks"])


def assert_attributed(profile: dict, depth: int = DEPTH) -> None:
    """Every block present, every node mapped, and the rows add up to the profiled node total."""
    assert [b["block"] for b in profile["blocks"]] == list(range(depth))
    assert profile["unmapped_nodes"] == 0 and profile["outside_blocks"][-1] == {
        "name": "unmapped", "ms": 0.0, "share": 0.0, "top_ops": []}
    assert rows_total(profile) == pytest.approx(profile["node_ms"], rel=1e-9)
    assert sum(profile["parts"].values()) == pytest.approx(sum(b["ms"] for b in profile["blocks"]), rel=1e-9)
    assert sum(o["ms"] for o in profile["op_types"]) == pytest.approx(profile["node_ms"], rel=1e-9)
    # the warm-up runs are not counted: the kernels fit inside a profiled run
    assert 0 < profile["node_ms"] <= 1.1 * profile["run_ms"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """vit_fmnist with recipes/svd.yaml (no fine-tune, small validation): every block's MLP converted."""
    out = tmp_path_factory.mktemp("profile") / "svd"
    convert("vit_fmnist", "recipes/svd.yaml", out_dir=out,
            overrides=[*FAST, "finetune=null", "validate.batch_sizes=[1]", "validate.profile_runs=3"])
    return out


@pytest.mark.slow
def test_convert_report_has_per_block_profile(bundle):
    report = json.loads((bundle / "report.json").read_text())
    original, converted = report["profile"]["original"], report["profile"]["converted"]
    for profile in (original, converted):
        assert_attributed(profile)
        assert profile["runs"] == 3 and profile["batch_size"] == 1 and profile["threads"] == 2
        assert all(b["parts"]["attn"] > 0 and b["parts"]["mlp"] > 0 for b in profile["blocks"])
    assert all(b["steps"] == [] for b in original["blocks"]) and original["steps"] == []
    for b in converted["blocks"]:
        assert [(s["step"], s["transform"]) for s in b["steps"]] == [(0, "svd_lowrank")]
        assert 0 < b["steps"][0]["ms"] <= b["parts"]["mlp"]  # fc1 + fc2: the MLP's linears
    (svd,) = converted["steps"]
    assert svd["ms"] == pytest.approx(sum(b["steps"][0]["ms"] for b in converted["blocks"]), rel=1e-9)
    markdown = (bundle / "report.md").read_text()
    assert "| block | recipe steps | original ms | converted ms | speed-up |" in markdown
    assert f"Original → converted, all blocks: attn {original['parts']['attn']:.2f} → " in markdown
    assert sum(line.startswith(f"| {i} | 0:svd_lowrank |") for i in range(DEPTH) for line in markdown.splitlines()) \
        == DEPTH


@pytest.mark.slow
def test_cli_profile_json_with_baseline(bundle):
    result = invoke("profile", bundle, "--runs", 2, "--warmup", 1, "--baseline", bundle / "model.onnx", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["bundle"] == str(bundle) and data["converted"]["threads"] == 2  # the bundle's validation threads
    for profile in (data["converted"], data["baseline"]):
        assert_attributed(profile)
        assert profile["runs"] == 2 and profile["warmup_runs"] == 1
    assert all(b["steps"] and b["steps"][0]["transform"] == "svd_lowrank" for b in data["converted"]["blocks"])


@pytest.mark.slow
def test_cli_profile_table(bundle):
    args = ["profile", str(bundle), "--runs", "2", "--threads", "1", "--batch-size", "2"]
    result = CliRunner().invoke(main, args, env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    title = " ".join(result.output.split())  # rich wraps the title to the table's width (it holds the bundle path)
    assert "batch 2" in title and "1 threads" in title
    assert result.output.count("0:svd_lowrank") == DEPTH
    assert "patch_embed" in result.output and "unmapped" in result.output and "total" in result.output


@pytest.mark.export
def test_timm_vit_skip_and_svd_steps(tmp_path, test_vit):
    """A timm ViT export: the skipped block has no attention time, each step's modules carry its tag."""
    model = copy.deepcopy(test_vit)
    recipe = parse_recipe(yaml.safe_load("""
steps:
  - {transform: attention_skip, blocks: [3]}
  - {transform: svd_lowrank, targets: [blocks.5.mlp.fc1], rank: 16, whitening: none}
"""), "test")
    converted = apply_recipe(model, recipe)
    steps = [{"step": i, "transform": step.transform, "modules": modules}
             for i, (step, modules) in enumerate(zip(recipe.steps, converted))]
    path = export_onnx(model, tmp_path / "test_vit.onnx")
    profile = profile_onnx(path, steps=steps, runs=2, warmup_runs=1)
    assert_attributed(profile, depth=len(model.blocks))
    blocks = {b["block"]: b for b in profile["blocks"]}
    assert blocks[3]["parts"]["attn"] == 0 and blocks[3]["parts"]["mlp"] > 0
    assert [s["transform"] for s in blocks[3]["steps"]] == ["attention_skip"]
    assert [s["transform"] for s in blocks[5]["steps"]] == ["svd_lowrank"] and 0 < blocks[5]["steps"][0]["ms"]
    assert all(not b["steps"] for i, b in blocks.items() if i not in (3, 5))
    assert {o["name"] for o in profile["outside_blocks"]} >= {"patch_embed", "norm", "head", "unmapped"}


def test_bad_bundles_exit_2_one_line(tmp_path):
    assert one_error_line(invoke("profile", tmp_path / "missing").output)
    assert invoke("profile", tmp_path / "missing").exit_code == 2
    result = invoke("profile", tmp_path)
    assert result.exit_code == 2 and "has no model.onnx" in result.output and one_error_line(result.output)
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    result = invoke("profile", tmp_path)
    assert result.exit_code == 2 and "does not load in onnxruntime" in result.output and one_error_line(result.output)


def test_attribute_keeps_unmapped_time_and_tags_steps():
    nodes = [("qkv", "MatMul", 1000.0), ("fc1", "MatMul", 400.0), ("ln", "LayerNormalization", 100.0),
             ("add", "Add", 50.0), ("stem", "Conv", 200.0), ("lost", "Transpose", 250.0)]
    modules = {"qkv": "blocks.1.attn.qkv", "fc1": "blocks.1.mlp.fc1", "ln": "blocks.1.norm1", "add": "blocks.1",
               "stem": "patch_embed.proj", "lost": None}
    steps = [{"step": 0, "transform": "svd_lowrank", "modules": ["blocks.1.mlp.fc1"]},
             {"step": 1, "transform": "taylor_attention", "modules": ["blocks.0.attn"]}]
    profile = attribute(nodes, modules, steps)
    assert profile["node_ms"] == pytest.approx(2.0)
    b0, b1 = profile["blocks"]
    assert b0 == {"block": 0, "ms": 0.0, "share": 0.0, "parts": dict.fromkeys(("attn", "mlp", "norm", "other"), 0.0),
                  "steps": [{"step": 1, "transform": "taylor_attention", "ms": 0.0}], "top_ops": []}
    assert b1["ms"] == pytest.approx(1.55) and b1["parts"] == pytest.approx(
        {"attn": 1.0, "mlp": 0.4, "norm": 0.1, "other": 0.05})
    assert b1["steps"] == [{"step": 0, "transform": "svd_lowrank", "ms": pytest.approx(0.4)}]
    assert [(o["name"], o["ms"]) for o in profile["outside_blocks"]] == [("patch_embed", 0.2), ("unmapped", 0.25)]
    assert profile["unmapped_nodes"] == 1 and rows_total(profile) == pytest.approx(2.0)
    assert profile["parts"] == pytest.approx({"attn": 1.0, "mlp": 0.4, "norm": 0.1, "other": 0.05})
    assert profile["part_ops"]["norm"] == [{"op": "LayerNormalization", "ms": pytest.approx(0.1), "share": 100.0}]


def test_module_of_reads_torch_metadata_and_torchscript_names():
    def node(name: str, scopes: str | None = None) -> onnx.NodeProto:
        n = onnx.helper.make_node("Add", ["a", "b"], ["c"], name=name)
        if scopes is not None:
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
        return n

    assert module_of(node("node_linear", "['', 'blocks', 'blocks.3', 'blocks.3.attn', 'blocks.3.attn.qkv', "
                                         "'linear']")) == "blocks.3.attn.qkv"
    assert module_of(node("node_cat", "['', 'cat']")) == ""
    assert module_of(node("node_Shape_0", "['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int_1']")) == ""
    assert module_of(node("/blocks/blocks.3/attn/qkv/MatMul")) == "blocks.3.attn.qkv"
    assert module_of(node("/Add")) == ""
    assert module_of(node("Transpose_token_1")) is None


def test_hierarchical_blocks_are_numbered_in_depth_order_across_stages():
    """Swin's layers.N.blocks.M (and PVT-v2's stages.N.blocks.M) are blocks too, numbered in depth order."""
    from vitcompress.profile import attribute

    modules = {"a": "layers.0.blocks.0.attn.qkv", "b": "layers.0.blocks.1.mlp.fc1", "c": "layers.1.blocks.0.norm1",
               "d": "layers.0.downsample.reduction", "e": "head.fc"}
    nodes = [(name, "MatMul", 1000.0) for name in modules]
    steps = [{"step": 0, "transform": "svd_lowrank", "modules": ["layers.1.blocks.0.mlp.fc1"]}]
    profile = attribute(nodes, modules, steps)
    assert [(b["block"], b["parts"]["attn"], b["parts"]["mlp"], b["parts"]["norm"]) for b in profile["blocks"]] == [
        (0, 1.0, 0.0, 0.0), (1, 0.0, 1.0, 0.0), (2, 0.0, 0.0, 1.0)]
    assert [s["transform"] for s in profile["blocks"][2]["steps"]] == ["svd_lowrank"]
    assert [o["name"] for o in profile["outside_blocks"]] == ["layers", "head", "unmapped"]
