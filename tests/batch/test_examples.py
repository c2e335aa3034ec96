"""examples/ci/: the manifest loads and runs on the shipped model; the GitHub Actions workflow and the GitLab job
parse and run it as documented (shards from the CI's own matrix, the cache, JUnit, merge)."""

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from junitparser import JUnitXml

from tests.conftest import FAST
from vitcompress.batch.manifest import load_manifest
from vitcompress.batch.results import BatchResult
from vitcompress.cli import main

ROOT = Path(__file__).parents[2]
CI = ROOT / "examples" / "ci"
MANIFEST = "examples/ci/manifest.yaml"


def test_example_manifest_loads_into_the_documented_jobs():
    jobs = {job.name: job for job in load_manifest(CI / "manifest.yaml").jobs}
    assert set(jobs) == {"vit_fmnist-svd", "vit_fmnist-fast", "vit_fmnist-skip-nightly"}
    assert jobs["vit_fmnist-skip-nightly"].cadence == ["nightly"]
    assert all(job.recipe_path.parent.name == "recipes" for job in jobs.values())


def test_github_workflow_shards_caches_merges_and_reports_junit():
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"pull_request", "schedule"} <= set(triggers)
    batch, report = workflow["jobs"]["batch"], workflow["jobs"]["report"]
    shards = batch["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and batch["strategy"]["fail-fast"] is False
    steps = {step.get("uses", step.get("name")): step for step in batch["steps"]}
    cache = steps["actions/cache@v4"]["with"]
    assert cache["path"] == "batch-out/jobs"
    for watched in (MANIFEST, "recipes/**", "requirements.lock"):
        assert watched in cache["key"]
    command = steps["Convert"]["run"]
    assert f"vitcompress batch {MANIFEST} --out batch-out" in command
    assert f"--shard ${{{{ matrix.shard }}}}/{len(shards)}" in command
    assert "batch-out/junit.xml" in steps["actions/upload-artifact@v4"]["with"]["path"]
    report_steps = {step.get("uses", step.get("name")): step for step in report["steps"]}
    assert report["needs"] == "batch" and report["if"] == "always()"
    assert report_steps["Merge shards"]["run"] == "vitcompress batch merge shards/*/batch.json --out merged"
    assert report_steps["mikepenz/action-junit-report@v4"]["with"]["report_paths"] == "merged/junit.xml"


def test_gitlab_job_shards_by_node_index_and_reports_junit():
    job = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["vitcompress-batch"]
    assert job["parallel"] == 2 and job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == "batch-out/junit.xml"
    assert MANIFEST in job["cache"]["key"]["files"] and job["cache"]["paths"] == ["batch-out/jobs"]
    (command,) = [line for line in job["script"] if line.startswith("vitcompress batch")]
    assert f"vitcompress batch {MANIFEST} --out batch-out" in command
    assert "--shard $CI_NODE_INDEX/$CI_NODE_TOTAL" in command


@pytest.mark.slow
def test_example_manifest_runs_on_the_shipped_model(tmp_path, monkeypatch):
    """The pull-request cadence of the example manifest, at the tests' FAST budget (the gates of 3 fine-tune
    steps may fail: the run must only never crash), two jobs at once; the nightly job is skipped."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(ROOT)
    overrides = [x for item in FAST for x in ("--set", item)]
    result = CliRunner().invoke(main, ["batch", MANIFEST, "--out", str(tmp_path), "--cadence", "pr", "--jobs", "2",
                                       "--fail-on", "error", *overrides], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    batch = BatchResult.load(tmp_path / "batch.json")
    status = {job.name: job.status for job in batch.jobs}
    assert status["vit_fmnist-skip-nightly"] == "skipped"
    assert {status["vit_fmnist-svd"], status["vit_fmnist-fast"]} <= {"passed", "gate_failed"}
    assert all(job.metrics["top1_original"] > 80 for job in batch.jobs if job.metrics)  # the embedded weights
    xml = JUnitXml.fromfile(str(tmp_path / "junit.xml"))
    assert xml.errors == 0 and len(list(xml)) == 3
