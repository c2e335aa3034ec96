"""`vitcompress batch`: bad manifests and usage are one error line naming the file and key path, exit 2, and
nothing runs (no output folder); a good manifest expands into the jobs it declares."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from vitcompress.batch.manifest import load_manifest
from vitcompress.batch.runner import select
from vitcompress.cli import main

RECIPE = """
steps:
  - {transform: svd_lowrank, targets: ["blocks.0.mlp.fc1"], rank_ratio: 0.5}
validate: {batch_sizes: [1]}
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "ckpt.safetensors").write_bytes(b"not read before a job runs")
    return tmp_path


def run_batch(folder: Path, manifest: str, *args: str):
    (folder / "m.yaml").write_text(manifest)
    result = CliRunner().invoke(main, ["batch", str(folder / "m.yaml"), "--out", str(folder / "out"), *args],
                                catch_exceptions=False)
    return result


BAD = {
    "unknown top key": ("version: 1\njobz: []\n", "m.yaml: jobz: unknown key"),
    "version missing": ("jobs: [{name: a, recipe: r.yaml}]\n", "m.yaml: version: Field required"),
    "bad name": ("version: 1\njobs: [{name: -a, model: test_vit, recipe: r.yaml}]\n", "m.yaml: jobs.0.name"),
    "duplicate ignoring case": ("version: 1\njobs:\n  - {name: A, model: test_vit, recipe: r.yaml}\n"
                                "  - {name: a, model: test_vit, recipe: r.yaml}\n",
                                "m.yaml: jobs.1.name: job name 'a'"),
    "matrix name clash": ("version: 1\nmatrix: {models: [test_vit], recipes: [r.yaml]}\n"
                          "jobs: [{name: test_vit-r, model: test_vit, recipe: r.yaml}]\n", "jobs.0.name"),
    "missing recipe": ("version: 1\njobs: [{name: a, model: test_vit, recipe: nope.yaml}]\n",
                       "m.yaml: jobs.0.recipe: recipe nope.yaml does not exist"),
    "recipe override": ("version: 1\ndefaults: {set: [validate.bogus=1]}\njobs: [{name: a, model: test_vit, "
                        "recipe: r.yaml}]\n", "m.yaml: jobs.0:"),
    "unknown model": ("version: 1\njobs: [{name: a, model: not_a_vit_at_all, recipe: r.yaml}]\n",
                      "m.yaml: jobs.0.model"),
    "missing checkpoint": ("version: 1\njobs: [{name: a, model: test_vit, recipe: r.yaml, checkpoint: x.pth}]\n",
                           "m.yaml: jobs.0.checkpoint: x.pth is not a file"),
    "gate on an unmeasured batch": ("version: 1\njobs: [{name: a, model: test_vit, recipe: r.yaml, "
                                    "gates: {min_speedup: {b8: 1.5}}}]\n", "jobs.0.gates.min_speedup: b8 not measured"),
    "wrong gate type": ("version: 1\ndefaults: {gates: {min_agreement: lots}}\njobs: []\n",
                        "m.yaml: defaults.gates.min_agreement"),
    "duplicate YAML key": ("version: 1\nversion: 1\n", "duplicate key 'version'"),
    "no jobs": ("version: 1\n", "no jobs"),
    "list": ("- a\n", "a manifest is a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_line_exit_2_and_nothing_runs(folder, case):
    text, expected = BAD[case]
    result = run_batch(folder, text)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (folder / "out").exists()


def test_reference_model_without_its_embedded_weights_is_a_manifest_error(folder, monkeypatch):
    import vitcompress.models as models

    monkeypatch.setattr(models, "reference_weights_path", lambda name: folder / f"{name}.safetensors")
    result = run_batch(folder, "version: 1\njobs: [{name: a, model: vit_fmnist, recipe: r.yaml}]\n")
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "m.yaml: jobs.0.model: embedded weights" in result.output and "--model vit_fmnist" in result.output
    assert not (folder / "out").exists()
    ok = "version: 1\njobs: [{name: a, model: vit_fmnist, recipe: r.yaml, random_init: true}]\n"
    assert load_manifest_text(folder, ok).jobs[0].random_init  # random weights need no file


def load_manifest_text(folder: Path, text: str):
    (folder / "m.yaml").write_text(text)
    return load_manifest(folder / "m.yaml")


@pytest.mark.parametrize("args, expected", [(["--shard", "3/2"], "--shard"), (["--jobs", "1024"], "--jobs 1024"),
                                            (["--fail-on", "sometimes"], "--fail-on")])
def test_bad_usage_is_exit_2(folder, args, expected):
    result = run_batch(folder, "version: 1\njobs: [{name: a, model: test_vit, recipe: r.yaml}]\n", *args)
    assert result.exit_code == 2 and result.output.startswith("error: ") and expected in result.output
    assert not (folder / "out").exists()


def test_manifest_expands_matrix_and_jobs_with_defaults_shards_and_cadence(folder):
    (folder / "m.yaml").write_text("""
version: 1
defaults: {random_init: true, timeout: 60, set: [finetune=null], gates: {min_agreement: 0.5}, cadence: [pr]}
matrix: {models: [test_vit, vit_fmnist], recipes: [r.yaml, svd], gates: {max_abs_diff: 0.01}}
jobs:
  - {name: nightly, model: test_vit, recipe: r.yaml, set: [validate.threads=1], cadence: [nightly],
     gates: {min_speedup: {b1: 1.1}}, random_init: false, checkpoint: ckpt.safetensors}
""")
    jobs = {job.name: job for job in load_manifest(folder / "m.yaml").jobs}
    assert set(jobs) == {"test_vit-r", "test_vit-svd", "vit_fmnist-r", "vit_fmnist-svd", "nightly"}
    matrix, nightly = jobs["vit_fmnist-svd"], jobs["nightly"]
    assert matrix.recipe.finetune is None and matrix.random_init and matrix.timeout == 60
    assert matrix.gates.min_agreement == 0.5 and matrix.gates.max_abs_diff == 0.01
    assert nightly.overrides == ["finetune=null", "validate.threads=1"] and nightly.recipe.validate_.threads == 1
    assert nightly.checkpoint == folder / "ckpt.safetensors" and not nightly.random_init
    assert nightly.gates.min_speedup == {"b1": 1.1} and nightly.gates.max_abs_diff is None
    shards = [{j.name for j in select(list(jobs.values()), (k, 2), None)[0]} for k in (1, 2)]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(jobs)
    assert shards == [{j.name for j in select(list(jobs.values()), (k, 2), None)[0]} for k in (1, 2)]
    run, skipped = select(list(jobs.values()), None, "pr")
    assert [r.name for r in skipped] == ["nightly"] and len(run) == 4


def test_smoke_jobs_are_shallow_copies_deep_enough_for_every_selector(folder):
    """--smoke gives each job depth max(2, the blocks its resolved recipe names); no shallowing when that is the
    model's full depth. Shipped recipes: svd names no block; skip skips blocks [2, 4]; skip_cka picks 4 blocks;
    shiftadd names the last two blocks (blocks[-2:].attn), so 2 suffice; a job override naming blocks.3 counts too."""
    (folder / "m.yaml").write_text("""
version: 1
matrix: {models: [vit_fmnist], recipes: [svd, skip, skip_cka, shiftadd]}
jobs:
  - {name: local, model: test_vit, recipe: r.yaml, set: ['steps.0.targets=["blocks.3.mlp.fc1"]']}
""")
    jobs = {job.name: job for job in load_manifest(folder / "m.yaml", smoke=True).jobs}
    assert {name: job.model_args for name, job in jobs.items()} == {
        "vit_fmnist-svd": {"depth": 2}, "vit_fmnist-skip": {"depth": 5}, "vit_fmnist-skip_cka": {"depth": 4},
        "vit_fmnist-shiftadd": {"depth": 2}, "local": {"depth": 4}}
    assert all(job.random_init and job.data == "synthetic" for job in jobs.values())
    assert not any(job.model_args for job in load_manifest(folder / "m.yaml").jobs)


def test_smoke_copies_of_hierarchical_models_keep_each_stage_up_to_the_depth_the_recipe_needs():
    """Swin and PVT-v2 take `depths` (blocks per stage): a --smoke copy keeps min(n, d) blocks of each stage, which
    holds every fixed per-stage index below d and at least d blocks in all for a relative selector."""
    from vitcompress.batch.manifest import full_depth, smoke_model_args
    from vitcompress.recipe import load_recipe

    assert full_depth("swin_tiny_patch4_window7_224") == [2, 2, 6, 2]
    assert smoke_model_args("swin_tiny_patch4_window7_224", load_recipe("svd")) == {"depths": [2, 2, 2, 2]}
    assert smoke_model_args("swin_tiny_patch4_window7_224", load_recipe("shift_mlp")) == {"depths": [2, 2, 2, 2]}
    assert smoke_model_args("pvt_v2_b0", load_recipe("svd")) == {}  # 2 blocks a stage already
    assert smoke_model_args("vit_fmnist", load_recipe("shiftadd")) == {"depth": 2}
