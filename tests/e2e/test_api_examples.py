"""examples/python_api.py and examples/custom_transform.py run as documented: the Python API's transform, export
and onnxruntime check; a third-party transform applied from Python and through `vitcompress convert` and
`vitcompress batch` by a recipe that names it in ``plugins:``."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.conftest import FAST

EXAMPLES = Path(__file__).parents[2] / "examples"
#: FAST's validation and calibration budgets; no fine-tune (the recipe has none: it would move the zeros).
SMALL = [item for item in FAST if not item.startswith("finetune.")]


@pytest.mark.export
def test_python_api_example_exports_a_model_that_onnxruntime_runs_as_torch_does(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    params = [int(n.replace(",", "")) for n in re.search(r"parameters: ([\d,]+) → ([\d,]+)", out).groups()]
    assert params[1] < params[0]
    assert float(re.search(r"max \|Δ logits\| = (\S+)", out).group(1)) < 1e-4
    assert float(re.search(r"top-1 agreement with the original model: ([\d.]+)%", out).group(1)) > 50
    assert (tmp_path / "model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.export
def test_custom_transform_example_runs_from_python_convert_and_batch(tmp_path):
    """The script runs in a folder other than examples/: the recipe finds its plugin in its own folder, in the
    convert process and in each batch job's process."""
    sets = [arg for item in SMALL for arg in ("--set", item)]
    out = subprocess.run([sys.executable, str(EXAMPLES / "custom_transform.py"), str(tmp_path / "out"), *sets],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"apply: 4 Linears pruned, [\d,]+ weights set to zero", out.stdout)
    report = json.loads((tmp_path / "out/convert/report.json").read_text())
    assert report["steps"][0]["transform"] == "magnitude_prune"
    assert report["steps"][0]["modules"] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                             "blocks.1.mlp.fc2"]
    fc1 = load_file(tmp_path / "out/convert/model.safetensors")["blocks.0.mlp.fc1.weight"]
    assert 0.49 < (fc1 == 0).mean() < 0.51
    batch = json.loads((tmp_path / "out/batch/batch.json").read_text())
    assert {job["name"]: job["status"] for job in batch["jobs"]} == {"vit_fmnist-prune50": "passed",
                                                                     "vit_fmnist-prune75": "passed"}
