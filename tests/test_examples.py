"""examples/deploy_onnxruntime.py: deployment with onnxruntime alone reproduces the pipeline's preprocessing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcompress.data import FMNIST_CLASSES, fmnist_dataset, load_fmnist_arrays
from vitcompress.stages.export import export_onnx, preprocessing_metadata

EXAMPLE = Path(__file__).parent.parent / "examples" / "deploy_onnxruntime.py"


@pytest.mark.export
def test_deploy_script_matches_pipeline_preprocessing_and_predictions(tmp_path, reference_model):
    meta = preprocessing_metadata(dict(reference_model.pretrained_cfg), list(FMNIST_CLASSES))
    onnx_path = export_onnx(reference_model, tmp_path / "m.onnx", (1, 28, 28), metadata=meta)
    raw, _ = load_fmnist_arrays("test")
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(raw[i, 0].numpy()).save(paths[-1])
    spec = importlib.util.spec_from_file_location("deploy", EXAMPLE)
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    expected = fmnist_dataset("test", limit=4).tensors[0].numpy()
    for i, path in enumerate(paths):
        np.testing.assert_allclose(deploy.preprocess(str(path), meta), expected[i], atol=1e-5)
    out = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_path), *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    predicted = reference_model(fmnist_dataset("test", limit=4).tensors[0]).argmax(-1).tolist()
    assert [line.split(": ")[1].rsplit(" (", 1)[0] for line in out] == [FMNIST_CLASSES[k] for k in predicted]
