"""DDP fine-tuning under torchrun: the same student from 2 gloo processes as from 1, and `convert --nproc`.

The workers are real torchrun jobs (``python -m torch.distributed.run``) on the CPU with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vitcompress.cli import main

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def worker_env() -> dict[str, str]:
    """The test's environment, with this checkout first on the path (the workers import vitcompress and tests)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def torchrun(nproc: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *map(str, args)], env=worker_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_two_gloo_processes_train_the_same_student_as_one(tmp_path):
    """4 steps, global batch 16: 2 processes × 8 images (DistributedSampler, averaged gradients) end with the
    weights of 1 process × 16 images, to fp32 tolerance; the weights moved far more than that tolerance."""
    two = torchrun(2, WORKER, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, tmp_path / "one"], env=worker_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert (report["world_size"], report["per_rank_batch"], report["backend"]) == (2, 8, "gloo")
    assert report["steps_done"] == 4
    assert json.loads((tmp_path / "one" / "finetune.json").read_text())["world_size"] == 1
    a = load_file(str(tmp_path / "one" / "student.safetensors"))
    b = load_file(str(tmp_path / "two" / "student.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)
    from tests.distributed.ddp_worker import tiny_vit

    start = tiny_vit().state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k.startswith("blocks"))
    assert moved > 1e-3


def test_nproc_with_a_batch_that_does_not_divide_starts_nothing(tmp_path):
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--recipe", "svd", "--out", str(tmp_path / "out"),
                                       "--nproc", "2", "--set", "finetune.batch_size=7"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "finetune.batch_size 7 is the global batch and does not divide among 2" in lines[0]
    assert not any(tmp_path.iterdir())


FAST_VALIDATE = ["validate.images=16", "validate.batch_sizes=[1]", "validate.latency_runs=3",
                 "validate.warmup_runs=1", "validate.profile_runs=0"]


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank_with_one_error_line(tmp_path):
    """torchrun's launcher (as `convert --nproc 2` starts it) on a command whose rank 1 raises in the fine-tune:
    every rank ends, the launcher reports rank 1's error once, the workers print none, no bundle."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_fmnist\nsteps: []\nfinetune: {steps: 3, batch_size: 8}\n")
    args = ["convert", "vit_fmnist", "--recipe", str(recipe), "--out", str(tmp_path / "out"),
            *[f"--set={s}" for s in FAST_VALIDATE]]
    code = ("import json, sys; from vitcompress.training.launch import launch; "
            f"print(json.dumps(launch(2, {args!r}, program=[{str(Path(__file__).with_name('failing_rank.py'))!r}])))")
    result = subprocess.run([sys.executable, "-c", code], env=worker_env(), cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    exit_code, line = json.loads(result.stdout.strip().splitlines()[-1])
    assert exit_code == 70, result.stderr[-3000:]
    assert line.startswith("rank 1: internal error: ValueError: injected failure on this rank"), line
    assert "error:" not in result.stderr, "the workers print no error line of their own under the launcher"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_failing_rank_stopped_by_torchrun_after_recording_keeps_its_exit_code(tmp_path, monkeypatch):
    """The race CI met: rank 1 records its error and is about to exit 70, rank 0 (its collective broken) exits
    first, and torchrun stops rank 1 with SIGTERM. The launcher still reports rank 1's line with code 70, not 143."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from vitcompress.training.launch import _first_failure, record_failure

    files = {rank: tmp_path / f"error-{rank}.json" for rank in (0, 1)}
    for rank, secondary in ((1, False), (0, True)):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[rank]))
        record_failure(f"rank {rank}: internal error", secondary, 70)
    failures = {0: ProcessFailure(0, 100, 70, str(files[0])), 1: ProcessFailure(1, 101, -15, str(files[1]))}
    assert _first_failure(ChildFailedError("convert", failures)) == (70, "rank 1: internal error")
    unrecorded = {0: ProcessFailure(0, 100, -9, str(tmp_path / "none.json"))}
    code, line = _first_failure(ChildFailedError("convert", unrecorded))
    assert code == 137 and line.startswith("rank 0 ended with exit code -9")
