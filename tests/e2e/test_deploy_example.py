"""examples/deploy_onnxruntime.py: deployment with onnxruntime alone (torch unimportable) gives the pipeline's
preprocessing and predictions."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcompress.data import FMNIST_CLASSES, fmnist_dataset, load_fmnist_arrays
from vitcompress.deploy.runtime import Preprocessing, preprocessing_metadata
from vitcompress.export import export_onnx

EXAMPLE = Path(__file__).parents[2] / "examples" / "deploy_onnxruntime.py"


@pytest.mark.export
def test_deploy_script_matches_pipeline_preprocessing_and_predictions(tmp_path, reference_model):
    meta = preprocessing_metadata(dict(reference_model.pretrained_cfg), list(FMNIST_CLASSES))
    onnx_path = export_onnx(reference_model, tmp_path / "m.onnx", metadata=meta)
    raw, _ = load_fmnist_arrays("test")
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(raw[i, 0].numpy()).save(paths[-1])
    expected = fmnist_dataset("test", limit=4).tensors[0].numpy()
    np.testing.assert_allclose(Preprocessing.from_metadata(meta).load(paths), expected, atol=1e-5)
    script = (f"import sys, runpy; sys.modules['torch'] = None; sys.argv = {[str(EXAMPLE), str(onnx_path)]!r} "
              f"+ {list(map(str, paths))!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    predicted = reference_model(fmnist_dataset("test", limit=4).tensors[0]).argmax(-1).tolist()
    names = [line.split(": ")[1].rsplit(" (", 1)[0] for line in out.splitlines()]
    assert names == [FMNIST_CLASSES[k] for k in predicted]
