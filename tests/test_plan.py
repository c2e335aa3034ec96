"""`vitcompress plan`: per-step params/MACs equal to the converted model's, step order, export check, bad input."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

from tests.test_cli import BAD_RECIPES, invoke, one_error_line, sets
from vitcompress import plan
from vitcompress.api import apply_recipe
from vitcompress.errors import ExportError
from vitcompress.export import to_deploy
from vitcompress.measure import count_macs, count_params
from vitcompress.models import load_model
from vitcompress.planner import compact_names, int8_mac_cost
from vitcompress.recipe import load_recipe

SKIP_THEN_SVD = """
model: vit_fmnist
steps:
  - transform: svd_lowrank
    targets: ["re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc1"]
    rank_ratio: 0.25
  - transform: attention_skip
    blocks: [2, 4]
finetune: {stages: [[svd_lowrank]]}
"""
SVD = str(Path(__file__).resolve().parents[1] / "recipes" / "svd.yaml")
TINY_SVD = """
steps:
  - transform: svd_lowrank
    targets: ["blocks.0.mlp.fc1"]
    rank: 4
"""


@pytest.fixture
def quiet_dir(tmp_path, monkeypatch):
    """Run in an empty working directory with a private temp directory; both must stay empty."""
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield work
    assert not list(work.iterdir()) and not list(temp.iterdir()), "plan wrote files"


@pytest.mark.export
def test_svd_plan_equals_the_converted_model(quiet_dir):
    result = plan("vit_fmnist", SVD, overrides=["calibration.batch_size=16"], calibration_images=32)
    recipe = load_recipe(SVD)
    reference = load_model("vit_fmnist").model
    want_macs = count_macs(reference, (1, 28, 28))
    assert result.original.model_dump() == {"params": count_params(reference), "macs": want_macs, "cost": want_macs}
    apply_recipe(reference, recipe, lambda: [torch.randn(16, 1, 28, 28)])
    reference = to_deploy(reference)
    (step,) = result.steps
    assert step.transform == "svd_lowrank" and step.matched == 24 == len(step.modules)
    assert step.params_after == result.final.params == count_params(reference)
    assert step.macs_after == result.final.macs == count_macs(reference, (1, 28, 28))
    assert step.speedup == step.cumulative_speedup == step.mac_speedup == want_macs / step.macs_after > 1.5
    assert result.calibration.model_dump() == {"data": "fmnist", "images": 32, "recipe_images": 512}
    assert result.export.exportable and result.export.error is None
    assert result.export.output_shape == [1, 10] and result.export.max_abs_diff < 1e-4
    assert set(result.seconds) == {"load", "measure", "steps", "export", "check", "total"}


@pytest.mark.export
def test_multi_step_plan_json_in_convert_order_without_data(quiet_dir):
    (quiet_dir / "r.yaml").write_text(SKIP_THEN_SVD)
    result = invoke("plan", "--recipe", "r.yaml", "--json")
    (quiet_dir / "r.yaml").unlink()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    skip, svd = report["steps"]
    assert (skip["step"], skip["transform"], svd["step"], svd["transform"]) == (1, "attention_skip", 0, "svd_lowrank")
    assert skip["matched"] == 2 and svd["matched"] == 12
    assert skip["macs_after"] == svd["macs_before"] and skip["params_after"] == svd["params_before"]
    assert skip["macs_after"] < skip["macs_before"] and svd["macs_after"] < svd["macs_before"]
    assert svd["cumulative_speedup"] == pytest.approx(skip["speedup"] * svd["speedup"])
    assert report["final"]["speedup"] == svd["cumulative_speedup"]
    assert report["calibration"] is None, "no step calibrates: no data opened"
    assert report["export"]["exportable"]


@pytest.mark.export
def test_int8_macs_count_at_their_measured_cost(quiet_dir):
    """A shift recipe keeps every MAC but runs the MLP's on int8 kernels: the plan predicts it faster than the
    MAC ratio (1×) says, by the cost onnxruntime measured for those MACs here."""
    result = plan("vit_fmnist", "shift_mlp", overrides=["finetune=null"])
    (step,) = result.steps
    assert step.mac_speedup == pytest.approx(1.0, abs=0.01)
    mlp = 12 * 50 * 2 * 192 * 768
    costs = {shape: int8_mac_cost(*shape) for shape in ((192, 768), (768, 192))}
    assert all(0 < cost < 1 for cost in costs.values()), costs
    want = step.macs_after - mlp + mlp / 2 * sum(costs.values())
    assert step.cost_after == pytest.approx(want) and step.speedup > 1.1


@pytest.mark.export
@pytest.mark.slow
def test_deit_plan_table_with_synthetic_calibration(quiet_dir):
    result = invoke("plan", "deit_t", "--random-init", "--recipe", SVD, "--calibration-images", 16,
                    *sets("calibration.batch_size=8"))
    assert result.exit_code == 0, result.output
    assert "deit_tiny_patch16_224" in result.stdout and "blocks.{0-11}.mlp.fc1" in result.stdout
    assert "exportable: yes" in result.stdout and "(1, 1000)" in result.stdout
    assert "calibrated on 16 of the recipe's 512 images (synthetic" in result.stdout


@pytest.mark.export
def test_model_arg_plans_a_shallow_copy(quiet_dir):
    (quiet_dir / "r.yaml").write_text(TINY_SVD)
    result = invoke("plan", "test_vit", "--random-init", "--model-arg", "depth=2", "--recipe", "r.yaml", "--json")
    (quiet_dir / "r.yaml").unlink()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "architecture changed: depth=2" in report["model"]["weights"] and report["export"]["exportable"]
    deep = count_params(load_model("test_vit", random_init=True).model)
    shallow = count_params(load_model("test_vit", random_init=True, model_args={"depth": 2}).model)
    assert report["original"]["params"] == shallow < deep


@pytest.mark.parametrize("failure", [ExportError("torch.onnx.export failed: boom"), RuntimeError("deep trouble")])
def test_export_failure_is_reported_exit_1(quiet_dir, monkeypatch, failure):
    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr("vitcompress.planner.export_onnx", broken)
    (quiet_dir / "r.yaml").write_text(TINY_SVD)
    result = invoke("plan", "test_vit", "--random-init", "--recipe", "r.yaml")
    (quiet_dir / "r.yaml").unlink()
    assert result.exit_code == 1
    assert "exportable: no (" in result.stdout and str(failure) in result.stdout and "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exit_2_one_line(quiet_dir, case):
    text, message = BAD_RECIPES[case]
    (quiet_dir / "r.yaml").write_text(text)
    result = invoke("plan", "test_vit", "--random-init", "--recipe", "r.yaml")
    (quiet_dir / "r.yaml").unlink()
    assert result.exit_code == 2 and message in result.output and one_error_line(result.output)


@pytest.mark.parametrize("args, message", [
    (["deit_xxl", "--random-init"], "unknown model 'deit_xxl'"),
    ([], "no model given"),
    (["test_vit", "--random-init", "--set", "steps.9.rank=2"], "no list item 9"),
    (["test_vit", "--checkpoint", "missing.pth"], "does not exist"),
    (["test_vit", "--model-arg", "depth=2"], "use it with --random-init"),
])
def test_bad_arguments_exit_2(quiet_dir, args, message):
    (quiet_dir / "r.yaml").write_text(TINY_SVD)
    result = invoke("plan", *args, "--recipe", "r.yaml")
    (quiet_dir / "r.yaml").unlink()
    assert result.exit_code == 2 and message in result.output and one_error_line(result.output)


def test_compact_names():
    names = [f"blocks.{i}.mlp.fc{j}" for i in range(12) for j in (1, 2)]
    assert compact_names(names) == ["blocks.{0-11}.mlp.fc1", "blocks.{0-11}.mlp.fc2"]
    assert compact_names(["blocks.1.attn", "blocks.2.attn", "blocks.5.attn", "head"]) == ["blocks.{1-2,5}.attn", "head"]
    assert compact_names(["blocks.3.attn"]) == ["blocks.3.attn"]
