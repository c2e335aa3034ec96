"""examples/train_reference.py: a run stopped part-way (``--max-steps``) and rerun ends with the same weights as
one uninterrupted run — the same batches, augmentations and schedule."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).parents[2] / "examples" / "train_reference.py"
QUICK = ["--train-images", "256", "--test-images", "64", "--batch-size", "64", "--epochs", "2", "--save-every", "3",
         "--warmup-steps", "2", "--no-bf16"]


def _train(tmp_path: Path, name: str, *extra: str) -> str:
    args = [sys.executable, str(SCRIPT), *QUICK, "--state-dir", str(tmp_path / name),
            "--out", str(tmp_path / f"{name}.safetensors"), *extra]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    _train(tmp_path, "whole")
    stopped = _train(tmp_path, "parts", "--max-steps", "5")  # past the end of epoch 1 (4 steps), into epoch 2
    assert "stopped after 5 steps (--max-steps) at epoch 2, step 1" in stopped
    assert not (tmp_path / "parts.safetensors").exists()
    assert "resumed at epoch 2, step 1" in _train(tmp_path, "parts")
    whole, parts = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "parts.safetensors"))
    assert whole.keys() == parts.keys()
    assert all((whole[k] == parts[k]).all() for k in whole)


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_a_device_this_machine_lacks_is_one_error_line_exit_2_and_nothing_written(tmp_path, device):
    args = [sys.executable, str(SCRIPT), *QUICK, "--device", device, "--state-dir", str(tmp_path / "state"),
            "--out", str(tmp_path / "weights.safetensors")]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: --device {device}: ")
    assert list(tmp_path.iterdir()) == []
