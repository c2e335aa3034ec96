"""examples/ci/: the manifest loads and runs on the shipped model; the GitHub Actions workflow and the GitLab job
parse and run it as documented (shards from the CI's own matrix, the cache, JUnit, merge), validate against their
CI system's schema and pass zizmor's security audit, both offline."""

import json
import os
import subprocess
import sys
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


def _uses(steps: list[dict]) -> dict[str, dict]:
    """Steps by action (without its pinned commit) or name."""
    return {step["uses"].split("@")[0] if "uses" in step else step.get("name", step.get("run")): step
            for step in steps}


def test_github_workflow_shards_caches_merges_and_reports_junit():
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"pull_request", "schedule"} <= set(triggers)
    batch, report = workflow["jobs"]["batch"], workflow["jobs"]["report"]
    shards = batch["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and batch["strategy"]["fail-fast"] is False
    steps = _uses(batch["steps"])
    cache = steps["actions/cache"]["with"]
    assert cache["path"] == "batch-out/jobs" and "restore-keys" not in cache
    for watched in ("vitcompress/**", MANIFEST, "recipes/**", "requirements.lock"):
        assert f"'{watched}'" in cache["key"]
    command = steps["Convert"]["run"]
    assert f"vitcompress batch {MANIFEST} --out batch-out" in command
    assert f'--shard "$SHARD/{len(shards)}"' in command and steps["Convert"]["env"]["SHARD"] == "${{ matrix.shard }}"
    upload = steps["actions/upload-artifact"]["with"]
    assert "batch-out/batch.json" in upload["path"] and upload["if-no-files-found"] == "error"
    report_steps = _uses(report["steps"])
    assert report["needs"] == "batch" and report["if"] == "always()"
    assert report_steps["Merge shards"]["run"] == "vitcompress batch merge shards/*/batch.json --out merged"
    assert workflow["permissions"] == {} and batch["permissions"] == report["permissions"] == {"contents": "read"}


def test_gitlab_jobs_shard_by_node_index_cache_by_content_and_merge():
    config = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    job, merge = config["vitcompress-batch"], config["vitcompress-merge"]
    assert job["parallel"] == 2 and job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == "shards/$CI_NODE_INDEX/junit.xml"
    assert job["cache"]["key"]["files"] == ["vitcompress/**/*", MANIFEST]  # GitLab's default limit: 2 entries
    assert "fallback_keys" not in job["cache"] and job["cache"]["paths"] == ["shards/$CI_NODE_INDEX/jobs"]
    (command,) = [line for line in job["script"] if line.startswith("vitcompress batch")]
    assert f"vitcompress batch {MANIFEST} --out shards/$CI_NODE_INDEX" in command
    assert "--shard $CI_NODE_INDEX/$CI_NODE_TOTAL" in command
    assert merge["needs"] == ["vitcompress-batch"] and merge["when"] == "always"
    assert merge["script"] == ["vitcompress batch merge shards/*/batch.json --out merged"]


def _tool(name: str) -> str:
    """A test dependency's console script, beside this interpreter (requirements.lock pins it)."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is a test dependency: pip install -r requirements.lock"
    return str(path)


@pytest.mark.parametrize(("file", "schema"), [("github-actions.yml", "vendor.github-workflows"),
                                              ("gitlab-ci.yml", "vendor.gitlab-ci")])
def test_workflows_validate_against_their_ci_schema(file, schema):
    done = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", schema, str(CI / file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_github_workflow_passes_zizmor_offline():
    """No finding above informational: actions pinned by commit, read-only permissions, no persisted token."""
    done = subprocess.run([_tool("zizmor"), "--offline", "--format", "json", str(CI / "github-actions.yml")],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(done.stdout)
    assert [(f["ident"], f["determinations"]["severity"]) for f in findings
            if f["determinations"]["severity"] != "Informational"] == [], done.stderr


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
