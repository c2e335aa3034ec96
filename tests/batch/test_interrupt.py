"""A batch killed with SIGKILL at random moments and resumed: no finished job is lost, none is half-written.

SIGKILL gives the batch no chance to clean up: whatever it leaves (a conversion's partial folder, a job record
written before its bundle, a bundle renamed into place before its record) must be read correctly by the next
run. Three seeded kill times fall in successive runs of one two-job batch (``--smoke``: ~10 s a job); after each kill the folder is
checked, and the last run completes it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vitcompress.batch.results import BatchResult
from vitcompress.cli import main

ROOT = Path(__file__).parents[2]
RECIPE = """
steps:
  - {transform: svd_lowrank, targets: ["re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc[12]"], rank_ratio: 0.5}
validate: {images: 16, batch_sizes: [1], latency_runs: 3, warmup_runs: 0, profile_runs: 0, threads: 1}
"""
JOBS = ("a", "b")
MANIFEST = ("version: 1\ndefaults: {random_init: true, data: synthetic, timeout: 300}\njobs:\n"
            + "".join(f"  - {{name: {name}, model: test_vit, recipe: r.yaml}}\n" for name in JOBS))


def finished_jobs(out: Path) -> set[str]:
    """Jobs whose record says their bundle is the one their key asks for (what a resume must take as is)."""
    done = set()
    for name in JOBS:
        try:
            record = json.loads((out / "jobs" / name / "cache_key.json").read_text())
        except (OSError, ValueError):
            continue
        if record.get("bundle") is not None and record["bundle"] == record["components"]:
            done.add(name)
    return done


def check_after_kill(out: Path) -> set[str]:
    """Every finished job's bundle verifies; a batch.json, if any, is whole. Returns the finished jobs."""
    done = finished_jobs(out)
    for name in done:
        result = CliRunner().invoke(main, ["verify", str(out / "jobs" / name / "bundle")])
        assert result.exit_code == 0, f"job {name}'s recorded bundle does not verify: {result.output}"
    if (out / "batch.json").exists():
        BatchResult.load(out / "batch.json")
    return done


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_loses_no_finished_job(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "m.yaml").write_text(MANIFEST)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITCOMPRESS_LATENCY_LOCK": str(tmp_path / "latency.lock")}
    command = [sys.executable, "-m", "vitcompress", "batch", str(tmp_path / "m.yaml"), "--out", str(out), "--json",
               "--smoke"]
    kills = 0
    for seed in (1, 2, 3):
        before = finished_jobs(out)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        time.sleep(random.Random(seed).uniform(1.5, 8.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=60)
        time.sleep(0.5)  # the killed batch's conversion gets SIGKILL from the kernel (PR_SET_PDEATHSIG)
        assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(out / "jobs"))], "orphan job"
        assert before <= check_after_kill(out), "a finished job was lost"
    assert kills >= 1  # the first kill (2.4 s) falls before any job can finish; later ones depend on speed
    kept = finished_jobs(out)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = BatchResult.model_validate_json(done.stdout)
    status = {job.name: job.status for job in result.jobs}
    assert {name for name, s in status.items() if s == "cached"} >= kept and set(status.values()) <= {"passed",
                                                                                                       "cached"}
    assert check_after_kill(out) == set(JOBS)
    assert not list(out.glob("jobs/*/.bundle.partial-*")) and not list(out.glob("jobs/*/.bundle.old-*"))


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
