"""`vitcompress batch` end to end with real conversions of timm's ``test_vit`` (random init, synthetic data).

One module-scoped batch holds a passing job, a job failing a manifest gate, a crashing job (a real checkpoint of
another architecture) and a job that times out (a real 3 s timeout); later runs in the same folder reuse its
bundles to test the cache, the exit codes, ``--fail-on``, resume after SIGTERM, shards + merge and baselines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from junitparser import Error, Failure, JUnitXml

from vitcompress.batch.results import BatchResult
from vitcompress.cli import main

ROOT = Path(__file__).parents[2]
RECIPE = """
steps:
  - {{transform: svd_lowrank, targets: ["re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc[12]"], rank_ratio: {ratio}}}
validate: {{images: 32, batch_sizes: [1], latency_runs: 3, warmup_runs: 0, profile_runs: 0, threads: 1}}
"""
SLOW_RECIPE = RECIPE.format(ratio=0.5) + "finetune: {steps: 100000, batch_size: 8}\n"


def manifest(*jobs: str, gate: float = 50.0) -> str:
    all_jobs = {
        "ok": "{name: ok, model: test_vit, recipe: r1.yaml}",
        "gate": f"{{name: gate, model: test_vit, recipe: r2.yaml, gates: {{min_speedup: {gate}}}}}",
        "crash": "{name: crash, model: test_vit, recipe: r1.yaml, random_init: false, checkpoint: other.safetensors}",
        "hang": "{name: hang, model: test_vit, recipe: r1.yaml, timeout: 3}",
        "slow": "{name: slow, model: test_vit, recipe: slow.yaml, cadence: [nightly]}",
    }
    lines = [f"  - {all_jobs[name]}" for name in jobs]
    return "version: 1\ndefaults: {random_init: true, data: synthetic, timeout: 300}\njobs:\n" + "\n".join(lines) + "\n"


def batch(folder: Path, text: str, *args: str, out: str = "out"):
    (folder / "m.yaml").write_text(text)
    result = CliRunner().invoke(main, ["batch", str(folder / "m.yaml"), "--out", str(folder / out), "--json", *args],
                                catch_exceptions=False)
    return result, (BatchResult.model_validate_json(result.stdout) if result.stdout.strip() else None)


def statuses(result: BatchResult) -> dict[str, tuple[str, bool | None]]:
    return {j.name: (j.status, j.cache.hit if j.cache else None) for j in result.jobs}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The four-job batch, run once, --jobs 2: (folder, CLI result, BatchResult)."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("batch")
    (folder / "r1.yaml").write_text(RECIPE.format(ratio=0.5))
    (folder / "r2.yaml").write_text(RECIPE.format(ratio=0.25))
    (folder / "slow.yaml").write_text(SLOW_RECIPE)
    other = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, folder / "other.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("VITCOMPRESS_LATENCY_LOCK", str(folder / "latency.lock"))
        result, parsed = batch(folder, manifest("ok", "gate", "crash", "hang"), "--jobs", "2")
        yield folder, result, parsed


@pytest.fixture
def env(first, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return first[0]


def test_failures_are_isolated_and_exit_code_is_3(first):
    folder, result, parsed = first
    assert result.exit_code == 3, result.output
    assert statuses(parsed) == {"ok": ("passed", False), "gate": ("gate_failed", False),
                                "crash": ("error", False), "hang": ("timeout", False)}
    jobs = {j.name: j for j in parsed.jobs}
    assert "another architecture" in jobs["crash"].error and jobs["crash"].exit_code == 2
    assert "timed out after 3 s" in jobs["hang"].error and jobs["hang"].duration_s < 20
    assert [g.message for g in jobs["gate"].failed_gates] == [
        f"speed-up b1 {jobs['gate'].metrics['speedup_b1']:.4g}× < 50×"]
    assert jobs["ok"].latency_wait_s is not None and jobs["ok"].threads == 1
    assert (folder / "out" / jobs["ok"].bundle / "model.onnx").is_file()
    assert not list((folder / "out" / "jobs").glob("*/.bundle.partial-*")), "a killed job left partial files"
    assert BatchResult.load(folder / "out" / "batch.json").counts == parsed.counts


def test_junit_reads_back_with_the_right_counts(first):
    folder, _, parsed = first
    xml = JUnitXml.fromfile(str(folder / "out" / "junit.xml"))
    suites = {suite.name: suite for suite in xml}
    assert set(suites) == {f"vitcompress.{name}" for name in ("ok", "gate", "crash", "hang")}
    assert (xml.errors, xml.failures) == (2, 1)
    assert xml.tests == 4 + sum(len(j.gates) for j in parsed.jobs)
    gate_cases = [case for case in suites["vitcompress.gate"] if case.name.startswith("gate min_speedup")]
    (failure,) = gate_cases[0].result
    assert isinstance(failure, Failure) and failure.message.startswith("speed-up b1") and "< 50×" in failure.message
    (error,) = next(iter(suites["vitcompress.crash"])).result
    assert isinstance(error, Error) and "another architecture" in error.message and "$ " in error.text
    properties = {p.name: p.value for p in suites["vitcompress.ok"].properties()}
    assert properties["status"] == "passed" and float(properties["speedup_b1"]) > 0
    summary = (folder / "out" / "summary.md").read_text()
    assert "| gate | ❌ gate failed |" in summary and "<details><summary>crash" in summary


def test_cache_gates_and_fail_on(first, env, monkeypatch):
    folder = env
    before = (folder / "out/jobs/gate/bundle/report.json").stat().st_mtime_ns
    result, parsed = batch(folder, manifest("ok", "gate"))
    assert result.exit_code == 1 and statuses(parsed) == {"ok": ("cached", True), "gate": ("gate_failed", True)}
    step_summary = folder / "step_summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    result = CliRunner().invoke(main, ["batch", str(folder / "m.yaml"), "--out", str(folder / "out")])
    assert result.exit_code == 1 and result.stdout.startswith("::error title=vitcompress batch gate (gate_failed)::"
                                                              "speed-up b1 "), result.stdout
    assert "| gate | ❌ gate failed |" in step_summary.read_text()
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert batch(folder, manifest("ok", "gate"), "--fail-on", "error")[0].exit_code == 0
    result, parsed = batch(folder, manifest("ok", "gate", gate=0.01))  # a changed gate re-converts nothing
    assert result.exit_code == 0 and statuses(parsed) == {"ok": ("cached", True), "gate": ("cached", True)}
    assert (folder / "out/jobs/gate/bundle/report.json").stat().st_mtime_ns == before
    record = json.loads((folder / "out/jobs/gate/cache_key.json").read_text())
    assert record["hit"] and record["bundle"] == record["components"]


@pytest.mark.slow
def test_changed_recipe_reruns_its_job_and_resume_after_sigterm_reruns_nothing_finished(first, env):
    folder = env
    (folder / "r2.yaml").write_text(RECIPE.format(ratio=0.125))
    (folder / "m.yaml").write_text(manifest("ok", "gate", "slow", gate=0.01))
    out = folder / "out"
    process = subprocess.Popen([sys.executable, "-m", "vitcompress", "batch", str(folder / "m.yaml"), "--out",
                                str(out), "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    key_file = out / "jobs/gate/cache_key.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the changed job has finished (its new bundle recorded)
        record = json.loads(key_file.read_text())
        if record["components"]["conversion"] == (record.get("bundle") or {}).get("conversion") and \
                (out / "jobs/slow/job.log").exists():
            break
        assert process.poll() is None, process.stdout.read().decode()
        time.sleep(0.5)
    assert record["reasons"] == ["recipe changed"]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 143, output
    assert "run the same command again to resume" in output
    interrupted = BatchResult.load(out / "batch.json")
    assert statuses(interrupted) == {"ok": ("cached", True), "gate": ("passed", False), "slow": ("error", False)}
    assert "interrupted" in interrupted.jobs[2].error
    assert not (out / "jobs/slow/bundle").exists() and not list((out / "jobs/slow").glob(".bundle.partial-*"))
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(out / "jobs" / "slow"))]
    result, parsed = batch(folder, manifest("ok", "gate", "slow", gate=0.01), "--cadence", "pr")
    assert result.exit_code == 0 and statuses(parsed) == {"ok": ("cached", True), "gate": ("cached", True),
                                                          "slow": ("skipped", None)}


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_two_shards_merged_equal_the_unsharded_job_set_and_baseline_regressions_fail(first, env):
    folder = env
    text = manifest("ok", "gate", gate=0.01)
    whole = batch(folder, text)[1]
    for k in (1, 2):  # CI restores the cache folder into each shard's output
        shutil.copytree(folder / "out/jobs", folder / f"s{k}/jobs", dirs_exist_ok=True)
        result, shard = batch(folder, text, "--shard", f"{k}/2", out=f"s{k}")
        assert result.exit_code == 0 and len(shard.jobs) == 1 and shard.jobs[0].status == "cached"
    merged = CliRunner().invoke(main, ["batch", "merge", str(folder / "s1/batch.json"), str(folder / "s2/batch.json"),
                                       "--out", str(folder / "merged")], catch_exceptions=False)
    assert merged.exit_code == 0, merged.output
    joined = BatchResult.load(folder / "merged/batch.json")
    assert sorted(j.name for j in joined.jobs) == sorted(j.name for j in whole.jobs)
    assert all((folder / "merged" / j.bundle / "report.json").is_file() for j in joined.jobs)
    assert len(list(JUnitXml.fromfile(str(folder / "merged/junit.xml")))) == 2
    assert [(r.shard, r.source, r.machine["cpu"] == whole.machine["cpu"], r.versions == whole.versions)
            for r in joined.shards] == [("1/2", "../s1/batch.json", True, True), ("2/2", "../s2/batch.json", True, True)]
    assert joined.manifest_sha256 == whole.manifest_sha256 and joined.missing_shards == []

    def merge_cli(*args: str):
        return CliRunner().invoke(main, ["batch", "merge", *args, "--out", str(folder / "bad")])

    twice = merge_cli(str(folder / "s1/batch.json"), str(folder / "s1/batch.json"))
    assert twice.exit_code == 2 and "shard 1/2 given twice" in twice.output
    missing = merge_cli(str(folder / "s1/batch.json"))
    assert missing.exit_code == 2 and _error_lines(missing.output) == [
        "error: missing shard 2/2: only 1/2 given (a shard that wrote no batch.json?); --allow-partial merges what "
        "is there"] and not (folder / "bad").exists()
    partial = merge_cli(str(folder / "s1/batch.json"), "--allow-partial")
    assert partial.exit_code == 0 and "merged without shard 2/2" in partial.output
    assert BatchResult.load(folder / "bad/batch.json").missing_shards == ["2/2"]
    assert "Missing shards 2/2" in (folder / "bad/summary.md").read_text()
    shutil.copytree(folder / "out/jobs", folder / "s3/jobs", dirs_exist_ok=True)
    assert batch(folder, text + "# another manifest, the same jobs\n", "--shard", "2/2", out="s3")[0].exit_code == 0
    foreign = merge_cli(str(folder / "s1/batch.json"), str(folder / "s3/batch.json"))
    (line,) = _error_lines(foreign.output)
    assert foreign.exit_code == 2 and line.startswith("error: results from different manifests cannot be merged: ")
    assert str(folder / "s1/batch.json") in line and str(folder / "s3/batch.json") in line

    doctored = whole.model_copy(deep=True)
    doctored.jobs[0].metrics["speedup_b1"] *= 3
    doctored.dump(folder / "baseline.json")
    result, compared = batch(folder, text, "--baseline", str(folder / "baseline.json"))
    assert result.exit_code == 1 and statuses(compared)["ok"] == ("gate_failed", True)
    (regression,) = compared.jobs[0].failed_gates
    assert regression.source == "baseline" and regression.gate == "speedup"
    assert statuses(compared)["gate"] == ("cached", True)


def test_machine_change_remeasures_latency_without_converting_again(first, env, monkeypatch):
    """Only the machine fingerprint changed (the test-only VITCOMPRESS_TEST_MACHINE): the job is re-measured in
    its own process, not converted — model.onnx keeps its bytes (a random-init conversion would not) — and the
    bundle's latency, report and checksums are rewritten so that verify passes."""
    folder = env
    shutil.copytree(folder / "out/jobs/ok", folder / "moved/jobs/ok")
    bundle = folder / "moved/jobs/ok/bundle"
    onnx, log = (bundle / "model.onnx").read_bytes(), (folder / "moved/jobs/ok/job.log").read_text()
    before = json.loads((bundle / "report.json").read_text())
    monkeypatch.setenv("VITCOMPRESS_TEST_MACHINE", "another")
    result, parsed = batch(folder, manifest("ok"), out="moved")
    assert result.exit_code == 0 and statuses(parsed) == {"ok": ("cached", False)}, result.output
    (job,) = parsed.jobs
    reason = "machine changed (test None → another): latency re-measured"
    assert job.cache.remeasured and job.cache.reasons == [reason]
    assert job.log == "jobs/ok/remeasure.log" and " batch remeasure " in (folder / "moved" / job.log).read_text()
    assert (bundle / "model.onnx").read_bytes() == onnx and (folder / "moved/jobs/ok/job.log").read_text() == log
    after = json.loads((bundle / "report.json").read_text())
    assert after["remeasured"]["reason"] == job.cache.reasons[0] and before["remeasured"] is None
    latency = [r["validation"]["models"]["converted"]["latency"] for r in (before, after)]
    assert latency[0] != latency[1] and latency[1] == json.loads((bundle / "inference.json").read_text())["latency"]
    changed = {k for k in after if after[k] != before[k]}
    assert {"validation", "remeasured"} <= changed <= {"validation", "remeasured", "machine"}
    assert after["validation"]["gates"] == before["validation"]["gates"] and after["steps"] == before["steps"]
    assert CliRunner().invoke(main, ["verify", str(bundle)]).exit_code == 0
    record = json.loads((folder / "moved/jobs/ok/cache_key.json").read_text())
    assert record["remeasured"] and record["bundle"] == record["components"]
    assert statuses(batch(folder, manifest("ok"), out="moved")[1]) == {"ok": ("cached", True)}


@pytest.mark.slow
def test_smoke_converts_a_shallow_copy_and_records_it(first, env):
    """--smoke: the job converts test_vit at depth 2 (its recipe names no block), and the report says so."""
    folder = env
    result, parsed = batch(folder, manifest("ok"), "--smoke", out="smoke")
    assert result.exit_code == 0 and statuses(parsed) == {"ok": ("passed", False)}, result.output
    report = json.loads((folder / "smoke" / parsed.jobs[0].bundle / "report.json").read_text())
    assert report["model"]["model_args"] == {"depth": 2} and "depth=2" in report["model"]["weights"]
    assert report["steps"][0]["modules"] == [f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    assert "--model-arg depth=2" in (folder / "smoke" / parsed.jobs[0].log).read_text()


def _copy_package(to: Path) -> Path:
    """The imported package's tree copied as a fresh clone would have it: other path, new modification times."""
    shutil.copytree(ROOT / "vitcompress", to / "vitcompress", copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_the_code_is_in_the_key_a_fresh_copy_hits_an_edited_transform_converts_again(first, env, tmp_path):
    """The same tree elsewhere (new paths and mtimes) hits the first run's bundle; a one-line edit to one
    transform's source makes the job convert again, with the copy's code, and names why."""
    folder = env
    shutil.copytree(folder / "out/jobs/ok", folder / "code/jobs/ok")
    (folder / "m.yaml").write_text(manifest("ok"))
    clone = _copy_package(tmp_path / "clone")
    run_env = {**os.environ, "PYTHONPATH": str(clone), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def run() -> BatchResult:
        done = subprocess.run([sys.executable, "-m", "vitcompress", "batch", str(folder / "m.yaml"), "--out",
                               str(folder / "code"), "--json"], capture_output=True, text=True, env=run_env,
                              cwd=tmp_path)  # not the checkout: `-m` imports from the working directory first
        assert done.returncode == 0, done.stderr
        return BatchResult.model_validate_json(done.stdout)

    assert statuses(run()) == {"ok": ("cached", True)}
    with open(clone / "vitcompress/transforms/lowrank.py", "a") as source:
        source.write("# an edit\n")
    (job,) = run().jobs
    assert (job.status, job.cache.hit) == ("passed", False)
    assert job.cache.reasons == ["code changed (the vitcompress package's files or the job's plugin transforms)"]


def test_file_hashes_are_remembered_by_size_and_mtime(tmp_path):
    """An unchanged file (same size and mtime) is not read again: its sha256 comes from the cache file; a
    touched one is hashed anew."""
    from vitcompress.batch.code_hash import FileHashes, fingerprint

    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/a.py").write_text("x = 1\n")
    store = tmp_path / "hashes.json"
    first_print = fingerprint(tree, hashes=FileHashes(store))
    stat = (tree / "sub/a.py").stat()
    (tree / "sub/a.py").write_text("x = 2\n")  # same size; mtime put back: the cache answers
    os.utime(tree / "sub/a.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(tree, hashes=FileHashes(store)) == first_print
    os.utime(tree / "sub/a.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(tree, hashes=FileHashes(store)) != first_print
    assert len(json.loads(store.read_text())) == 1
