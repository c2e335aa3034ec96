"""`convert --resume`: a conversion killed (SIGKILL) after a fine-tune checkpoint continues to the weights of an
uninterrupted run; a resume with another recipe is refused (exit 2, one line, nothing written)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from vitcompress.cli import main
from vitcompress.report import Report

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """model: vit_fmnist
steps: []
finetune: {steps: 12, batch_size: 8, lr: 1.0e-4, checkpoint_every: 3, workers: 0}
validate: {images: 16, batch_sizes: [1], latency_runs: 3, warmup_runs: 1, profile_runs: 0}
"""


@pytest.mark.slow
def test_killed_conversion_resumes_to_the_uninterrupted_weights(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    whole = CliRunner().invoke(main, ["convert", "--recipe", str(recipe), "--data", "synthetic", "--out",
                                      str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    args = ["convert", "--recipe", str(recipe), "--data", "synthetic", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "vitcompress", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    latest = tmp_path / ".out.partial-checkpoint" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (tmp_path / "out").exists()

    changed = CliRunner().invoke(main, [*args, "--resume", "--set", "finetune.lr=2.0e-4"])
    assert changed.exit_code == 2 and len(changed.output.strip().splitlines()) == 1
    assert "--resume: this is not the interrupted conversion: recipe changed" in changed.output
    assert not (tmp_path / "out").exists() and latest.exists()

    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    report = Report.load(tmp_path / "out")
    assert 0 < report.finetune.resumed_from_step < 12 and report.finetune.steps_done == 12
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not latest.parent.exists(), "the checkpoints go once the bundle is in place"
