"""The CLI end to end through click's CliRunner: happy paths, gate failure, and every bad input."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.deploy.bundle import write_checksums

TINY_SVD = """
steps:
  - transform: svd_lowrank
    targets: ["re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc[12]"]
    rank_ratio: 0.25
    whitening: cholesky
finetune: {steps: 2, batch_size: 8}
validate: {images: 16, latency_runs: 3, warmup_runs: 1}
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(output: str) -> bool:
    """Exactly one error line, the last one, and no traceback (stage lines before it are progress)."""
    lines = output.strip("\n").splitlines()
    return sum("error" in line.lower() for line in lines) == 1 and lines[-1].startswith("error: ") \
        and "Traceback" not in output


def sets(*items):
    return [x for item in items for x in ("--set", item)]


@pytest.fixture
def svd_recipe(tiny_recipe):
    return tiny_recipe(TINY_SVD)


@pytest.mark.slow
def test_convert_tiny_vit_happy_path(tmp_path, svd_recipe):
    out = tmp_path / "run"
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--out", out,
                    *sets("calibration.images=16"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "model.onnx", "model.safetensors", "recipe.resolved.yaml", "report.json", "report.md", "preprocess.json",
        "labels.txt", "golden", "inference.json", "predict.py", "requirements.txt", "SHA256SUMS", "report.html",
        "predictions.npz", *(["report"] if report["explain"]["shown"] else [])}
    assert result.output.rstrip().splitlines()[-1] == f"report: {(out / 'report.html').resolve()}"
    assert report["model"]["weights"].startswith("random init")
    assert report["steps"][0]["transform"] == "svd_lowrank" and len(report["steps"][0]["modules"]) == 12
    converted, original = report["validation"]["models"]["converted"], report["validation"]["models"]["original"]
    assert converted["params"] < original["params"] and converted["macs"] < original["macs"]
    assert converted["parity"]["max_abs_diff"] < 1e-3
    assert set(converted["latency"]) == {"b1", "b8"}
    assert report["finetune"]["steps_done"] == 2
    assert "original" in result.output and "converted" in result.output
    time_line = next(line for line in result.output.splitlines() if line.startswith("time: "))
    assert "transform" in time_line and "validate" in time_line and "page" in time_line
    assert [stage["stage"] for stage in report["timings"]["stages"]][-2:] == ["bundle", "page"]
    assert not list(tmp_path.glob(".run.partial-*"))


@pytest.mark.slow
def test_convert_reference_model_with_embedded_weights_and_json(tmp_path):
    out = tmp_path / "demo"
    result = invoke("convert", "vit_fmnist", "--recipe", "recipes/svd.yaml", "--out", out, "--json", *sets(*FAST))
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["model"]["weights"] == "embedded (vit_fmnist.safetensors)"
    original = report["validation"]["models"]["original"]
    assert original["top1"] > 80, "the embedded model must be the trained one"
    assert report["data"]["labelled"] and report["data"]["val_images"] == 64
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["vitcompress.mean"]) == [0.286] and "sandal" in meta["vitcompress.class_names"]


@pytest.mark.slow
def test_failed_gate_exits_1_and_keeps_the_bundle(tmp_path, svd_recipe):
    out = tmp_path / "run"
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--out", out,
                    *sets("calibration.images=16", "finetune=null", "validate.max_abs_diff=1e-12"))
    assert result.exit_code == 1
    assert "validation failed: max_abs_diff" in result.output
    assert json.loads((out / "report.json").read_text())["failed_gates"] == ["max_abs_diff"]


@pytest.mark.slow
def test_force_replaces_an_earlier_bundle(tmp_path, svd_recipe):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (out / "report.json").write_text('{"schema_version": 1}')
    write_checksums(out)  # a bundle lists every file in its SHA256SUMS: --force replaces nothing else
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--out", out, "--force",
                    *sets("calibration.images=16", "finetune=null", "validate.batch_sizes=[1]", "validate.images=8"))
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"], "no lock or old copy left"


@pytest.fixture
def foreign_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit2").state_dict(), path)
    return path


@pytest.fixture
def corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"not a safetensors file")
    return path


BAD_RECIPES = {
    "unknown key": ("steps: []\nfinetune: {stepz: 3}\n", "finetune.stepz: unknown key"),
    "unknown transform": ("steps:\n  - {transform: prune, targets: [x]}\n", "unknown transform 'prune'"),
    "wrong type": ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: [8]}\n", "steps.0.rank"),
    "rank out of range": ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: -3}\n", "steps.0.rank"),
    "energy out of range": ("steps:\n  - {transform: svd_lowrank, targets: [x], energy: 0}\n", "steps.0.energy"),
    "target matches nothing": ("steps:\n  - {transform: svd_lowrank, targets: [blocks.42.mlp.fc1], rank: 8}\n",
                               "target 'blocks.42.mlp.fc1' matches no module"),
    "finetune device": ("steps: []\nfinetune: {device: tpu}\n", "finetune.device: Input should be 'auto', 'cpu'"),
    "taylor centre": ("steps:\n  - {transform: taylor_attention, targets: [blocks.*.attn], center: rows}\n",
                      "steps.0.center: Input should be 'tokens' or 'channels'"),
    "unknown role": ("steps:\n  - {transform: svd_lowrank, targets: ['role:mlp.fc3'], rank: 8}\n",
                     "steps.0.targets.0: selector 'role:mlp.fc3': unknown role 'mlp.fc3'"),
    "bad block positions": ("steps:\n  - {transform: svd_lowrank, targets: ['blocks[1:2:3].mlp.fc1'], rank: 8}\n",
                            "steps.0.targets.0: selector 'blocks[1:2:3].mlp.fc1': [1:2:3] is not an index"),
    "block beyond the depth": ("steps:\n  - {transform: svd_lowrank, targets: [blocks.0.mlp.fc1], rank: 8}\n"
                               "  - {transform: shift_linear, targets: ['role:mlp.fc2[-7]']}\n",
                               "step 1 (shift_linear): selector 'role:mlp.fc2[-7]': block -7 is outside the "
                               "model's 6 blocks"),
    "not cheaper": ("steps:\n  - {transform: svd_lowrank, targets: [blocks.0.mlp.fc1], rank: 60}\n",
                    "is not cheaper than the dense"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exit_2_one_line_nothing_written(tmp_path, tiny_recipe, case):
    text, message = BAD_RECIPES[case]
    out = tmp_path / "run"
    result = invoke("convert", "test_vit", "--recipe", tiny_recipe(text), "--random-init", "--out", out)
    assert result.exit_code == 2
    assert message in result.output
    assert one_error_line(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("args, message", [
    (["deit_xxl", "--random-init"], "unknown model 'deit_xxl'"),
    (["test_vit", "--checkpoint", "{tmp}/missing.pth"], "does not exist"),
    (["test_vit", "--checkpoint", "{corrupt}"], "cannot be read"),
    (["test_vit", "--checkpoint", "{foreign}"], "is for another architecture"),
    (["test_vit", "--checkpoint", "{foreign}", "--random-init"], "exclude each other"),
    (["test_vit", "--random-init", "--data", "{tmp}/no_such_dir"], "not a directory"),
    (["test_vit", "--data", "synthetic", "--checkpoint", "{foreign}"], "is for another architecture"),
    (["test_vit", "--random-init", "--data", "fmnist"], "needs a 1×28×28 model input"),
    (["test_vit", "--random-init", "--set", "finetune.steps"], "expected key.path=value"),
    (["test_vit", "--random-init", "--set", "steps.9.rank=2"], "no list item 9"),
    ([], "no model given"),
])
def test_bad_arguments_exit_2(tmp_path, svd_recipe, foreign_checkpoint, corrupt_checkpoint, args, message):
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path, corrupt=corrupt_checkpoint, foreign=foreign_checkpoint) for a in args]
    result = invoke("convert", *args, "--recipe", svd_recipe, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and one_error_line(result.output)
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_missing_fashion_mnist(tmp_path, monkeypatch, svd_recipe):
    monkeypatch.setenv("VITCOMPRESS_FMNIST_DIR", str(tmp_path / "empty"))
    result = invoke("convert", "vit_fmnist", "--recipe", svd_recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "run").exists()


def test_unlabelled_image_directory_without_model_data(tmp_path, svd_recipe):
    empty = tmp_path / "images"
    empty.mkdir()
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--data", empty,
                    "--out", tmp_path / "run")
    assert result.exit_code == 2 and "holds no images" in result.output


def test_existing_output_without_force(tmp_path, svd_recipe):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--out", out)
    assert result.exit_code == 2 and "exists: pass --force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_recipe_and_usage_errors(tmp_path):
    result = invoke("convert", "test_vit", "--random-init", "--recipe", tmp_path / "none.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert invoke("convert", "test_vit").exit_code == 2
    assert invoke("convert", "test_vit", "--recipe", "x.yaml", "--bogus").exit_code == 2


def test_recipes_lists_transforms():
    result = invoke("recipes")
    assert result.exit_code == 0
    assert "svd_lowrank" in result.output and "whitening" in result.output and "rank_ratio" in result.output


def test_recipes_lists_the_shipped_recipes_with_descriptions():
    from vitcompress.recipe import recipe_description, shipped_recipes

    result = invoke("recipes")
    assert result.exit_code == 0
    for name, path in shipped_recipes().items():
        assert name in result.output
        assert recipe_description(path).split()[0] in result.output


@pytest.mark.parametrize("spec", ["no_such_recipe", "no_such_recipe.yaml"])
def test_unknown_recipe_name_exit_2_lists_shipped(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "test_vit", "--recipe", spec, "--random-init", "--out", "run")
    assert result.exit_code == 2 and one_error_line(result.output)
    assert f"recipe {spec} does not exist" in result.output and "shipped: cascade, fast" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("override", ["finetune.steps=0", "finetune=null"])
def test_zero_finetune_steps_skips_the_finetune(tmp_path, svd_recipe, override):
    out = tmp_path / "run"
    result = invoke("convert", "test_vit", "--recipe", svd_recipe, "--random-init", "--out", out, "--set", override,
                    *sets("calibration.images=16", "validate.batch_sizes=[1]", "validate.profile_runs=0"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["finetune"] is None
    assert "finetune: null" in (out / "recipe.resolved.yaml").read_text()


def test_offline_pretrained_fails_fast_with_one_line(tmp_path, monkeypatch):
    """No cached weights, hub unreachable: exit 2 within seconds, one error line, no huggingface_hub retries."""
    import time

    import huggingface_hub.constants

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["convert", "deit_s", "--recipe", "svd", "--out",
                                       str(tmp_path / "runs" / "run")])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2 and one_error_line(result.stderr), result.output
    assert "cannot be reached (offline?)" in result.stderr and "WARNING" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"] or not (tmp_path / "runs").exists(), \
        "not even the parent of --out is created"


@pytest.mark.slow
def test_shipped_recipe_by_file_name_from_an_empty_directory(tmp_path, monkeypatch):
    """`convert deit_s --recipe shiftadd.yaml` where no recipes/ folder is: the shipped file, the CLI's model."""
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "deit_s", "--recipe", "shiftadd.yaml", "--random-init", "--out", "run", *sets(
        *FAST, "finetune.steps=1", "finetune.batch_size=2", "validate.images=4", "validate.batch_sizes=[1]",
        "validate.profile_runs=0", "validate.max_abs_diff=1.0"))
    assert result.exit_code in (0, 1), result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model"]["name"] == "deit_small_patch16_224"
    assert [s["transform"] for s in report["steps"]] == ["shift_linear", "shiftadd_attention", "shiftadd_moe"]


@pytest.mark.slow
def test_diverging_finetune_is_stopped_reported_and_the_gates_judge_the_restored_model(tmp_path):
    """lr 10: the divergence guard stops the fine-tune and restores the pre-fine-tune weights; the report and the
    terminal say so, and the exit code is the gates' verdict on the model that was kept."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--recipe", "svd", "--out", str(out),
                                       *sets(*FAST, "finetune.steps=40", "finetune.lr=10", "finetune.warmup_steps=0",
                                             "validate.images=256")])
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["stopped"].startswith("diverged at step")
    assert "fine-tune stopped early: diverged" in " ".join(result.output.split())
    assert report["validation"]["models"]["converted"]["agreement"] > 0.9  # the diverged weights agree ~10 %
    assert result.exit_code == (1 if report["failed_gates"] else 0)


def test_resolved_recipe_records_the_modules_role_and_relative_selectors_matched(tmp_path, tiny_recipe):
    """recipe.resolved.yaml replaces each role / relative-depth selector by the modules it matched on this model
    (test_vit: 6 blocks), with the selectors as written in a comment; the report lists what was converted."""
    import yaml

    recipe = tiny_recipe("steps:\n  - {transform: shift_linear, targets: ['role:mlp.fc1[-2:]'], "
                         "ignore: ['blocks[-1].mlp.fc1']}\n")
    out = tmp_path / "run"
    result = invoke("convert", "test_vit", "--recipe", recipe, "--random-init", "--out", out, *sets(
        "finetune=null", "validate.images=8", "validate.batch_sizes=[1]", "validate.profile_runs=0",
        "validate.ladder_images=0", "validate.latency_runs=3", "validate.warmup_runs=0", "validate.max_abs_diff=0.1"))
    assert result.exit_code == 0, result.output
    text = (out / "recipe.resolved.yaml").read_text()
    step = yaml.safe_load(text)["steps"][0]
    assert step["targets"] == ["blocks.4.mlp.fc1", "blocks.5.mlp.fc1"] and step["ignore"] == ["blocks.5.mlp.fc1"]
    assert "# steps.0.targets: ['role:mlp.fc1[-2:]']\n# steps.0.ignore: ['blocks[-1].mlp.fc1']\n" in text
    assert json.loads((out / "report.json").read_text())["steps"][0]["modules"] == ["blocks.4.mlp.fc1"]
