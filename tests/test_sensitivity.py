"""`vitcompress sensitivity`: one cell per step and block group, each converting only its blocks; accuracy cost
and measured speed-up; not-applicable cells; bad input (one error line, exit 2, nothing written); --force."""

import json

import pytest

import vitcompress
from tests.test_cli import invoke, one_error_line, sets
from vitcompress.sensitivity_map import AppliedCell, Sensitivity, SkippedCell, block_groups, outside_selector

# svd on every MLP Linear; taylor on block 0's attention only (not applicable in the group of blocks 2–3)
TWO_STEPS = """
model: vit_fmnist
steps:
  - transform: svd_lowrank
    targets: ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
    rank: 4
  - transform: taylor_attention
    targets: [blocks.0.attn]
"""
TINY = ["--random-init", "--model-arg", "depth=4", "--data", "synthetic"]
FAST = [*sets("validate.warmup_runs=1"), "--images", "16", "--runs", "3"]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The CLI on the tiny 4-block vit_fmnist, 2 groups, 2 steps: sensitivity.json and the command's output."""
    root = tmp_path_factory.mktemp("sensitivity")
    recipe = root / "two.yaml"
    recipe.write_text(TWO_STEPS)
    out = root / "sensitivity.json"
    result = invoke("sensitivity", "--recipe", recipe, *TINY, *FAST, "--groups", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return Sensitivity.model_validate_json(out.read_text()), json.loads(out.read_text()), recipe


def test_groups_split_the_blocks_contiguously():
    assert block_groups(4, 2) == [[0, 1], [2, 3]]
    assert block_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert block_groups(3, 3) == [[0], [1], [2]]
    assert outside_selector([2, 3]) == r"re:(?!blocks\.(?:2|3)(?:\.|$)).*"


@pytest.mark.export
def test_the_json_has_one_cell_per_step_and_group(mapped):
    result, raw, _ = mapped
    assert raw["groups"] == [[0, 1], [2, 3]] and raw["batch_size"] == 1 and raw["runs"] == 3
    assert raw["model"] == {"name": "vit_fmnist", "blocks": 4, "weights": raw["model"]["weights"]}
    assert raw["recipe"]["steps"][0]["transform"] == "svd_lowrank" and raw["images"] == 16
    assert raw["labelled"] is False and raw["original_top1"] is None  # synthetic: agreement only
    assert {"machine", "date", "threads"} <= set(raw)
    assert [(s.step, s.transform, len(s.cells)) for s in result.steps] == [(0, "svd_lowrank", 2),
                                                                          (1, "taylor_attention", 2)]


@pytest.mark.export
def test_each_cell_converts_only_its_blocks_and_is_timed_against_the_original(mapped):
    result, _, _ = mapped
    for cell in result.steps[0].cells:
        assert isinstance(cell, AppliedCell)
        assert cell.modules == [f"blocks.{b}.mlp.{fc}" for b in cell.blocks for fc in ("fc1", "fc2")]
        assert 0 <= cell.agreement <= 1 and cell.top1 is None and cell.top1_drop is None
        assert cell.latency_ms > 0 and cell.speedup == pytest.approx(cell.original_ms / cell.latency_ms)
        assert cell.spread >= 0 and cell.original_spread >= 0
    first, second = result.steps[1].cells
    assert isinstance(first, AppliedCell) and first.modules == ["blocks.0.attn"]
    assert isinstance(second, SkippedCell) and second.blocks == [2, 3]
    assert "ignore removes every target" in second.reason


@pytest.mark.export
def test_the_python_api_measures_accuracy_on_labelled_data(tmp_path):
    recipe = tmp_path / "svd.yaml"
    recipe.write_text(TWO_STEPS.split("  - transform: taylor")[0].replace(', "blocks.*.mlp.fc2"', ""))
    result = vitcompress.sensitivity("vit_fmnist", recipe, random_init=True, model_args={"depth": 4}, data="fmnist",
                                     groups=1, images=24, runs=3, overrides=["validate.warmup_runs=1"])
    assert isinstance(result, vitcompress.Sensitivity) and result.labelled and result.images == 24
    (cell,) = result.steps[0].cells
    assert cell.blocks == [0, 1, 2, 3] and cell.modules == [f"blocks.{b}.mlp.fc1" for b in range(4)]
    # a drop of d points needs at least d % of the images to change their answer
    assert cell.top1_drop == pytest.approx(result.original_top1 - cell.top1)
    assert abs(cell.top1_drop) <= (1 - cell.agreement) * 100 + 1e-9


@pytest.mark.parametrize("args, message", [
    (["vit_nope", "--recipe", "svd", *TINY], "unknown model 'vit_nope'"),
    (["--recipe", "no_such_recipe.yaml", *TINY], "no_such_recipe"),
    (["--recipe", "cascade", *TINY], "cascade recipe"),
    (["--recipe", "svd", *TINY, "--groups", "0"], "--groups"),
    (["--recipe", "svd", *TINY, "--groups", "5"], "--groups 5: the model has 4 blocks"),
    (["resnet18", "--recipe", "svd", "--random-init", "--data", "synthetic"], "no transformer blocks"),
    (["--recipe", "svd", *TINY, *sets("steps.0.targets=[blocks.9.mlp.fc1]")], "matches no module"),
])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(tmp_path, args, message):
    out = tmp_path / "sensitivity.json"
    result = invoke("sensitivity", *args, "--out", out)
    assert result.exit_code == 2 and one_error_line(result.output), result.output
    assert message in result.output and not out.exists()


def test_an_existing_file_is_replaced_only_with_force(tmp_path, mapped):
    out = tmp_path / "sensitivity.json"
    out.write_text("{}")
    result = invoke("sensitivity", "--recipe", "svd", *TINY, "--out", out)
    assert result.exit_code == 2 and one_error_line(result.output) and "--force" in result.output
    assert out.read_text() == "{}"
    result = invoke("sensitivity", "--recipe", mapped[2], *TINY, *FAST, "--groups", "1", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    replaced = Sensitivity.model_validate_json(out.read_text())
    assert replaced.groups == [[0, 1, 2, 3]] and [len(step.cells) for step in replaced.steps] == [1, 1]
