"""vitcompress.deploy.runtime: torch-free sessions, timing, preprocessing equal to timm's, and the commands built on it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vitcompress.cli import main
from vitcompress.deploy.bundle import preprocess_spec
from vitcompress.deploy.runtime import (
    CASCADE_FILE,
    Preprocessing,
    Timing,
    measure_latency,
    open_session,
    preprocessing_metadata,
    run_batches,
)
from vitcompress.deploy.templates import predict as bundle_predict
from vitcompress.errors import DataError, ModelError
from vitcompress.models import REFERENCE_CFG, build_reference_architecture

# Real photographs of several sizes, none square, and a crop of a grey one (scikit-image's own samples).
PHOTOS = {"coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket(),
          "camera_crop": skimage.data.camera()[:301, :457], "text": skimage.data.text()}
CONFIGS = {
    "deit_s (bicubic, crop 0.875)": resolve_data_config(model=timm.create_model("deit_small_patch16_224")),
    "bilinear, crop 0.9": {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.9,
                           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_mode": "center"},
    "vit_fmnist (grey 28, crop 1)": resolve_data_config(model=build_reference_architecture()),
    "non-square input 160×224": {"input_size": (3, 160, 224), "interpolation": "bicubic", "crop_pct": 0.95,
                                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center"},
    "squash": {"input_size": (3, 96, 96), "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "squash",
               "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)},
}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_preprocessing_equals_timms_eval_transform_within_one_grey_level(config_name, photo):
    config = CONFIGS[config_name]
    channels = config["input_size"][0]
    image = Image.fromarray(PHOTOS[photo]).convert("L" if channels == 1 else "RGB")
    want = create_transform(**config, is_training=False)(image).numpy()
    got = Preprocessing.from_metadata(preprocessing_metadata(config, None))(image)
    assert got.shape == want.shape and got.dtype == np.float32
    grey_levels = np.abs(got - want) * np.asarray(config["std"], dtype=np.float32)[:, None, None] * 255
    assert grey_levels.max() <= 1.0, f"max difference {grey_levels.max():.3f} grey levels"


@pytest.mark.parametrize("config_name", CONFIGS)
def test_bundle_predict_py_preprocessing_equals_the_runtimes(config_name):
    """predict.py's own copy (it imports nothing of vitcompress) gives the runtime's arrays bit for bit, from
    the preprocess.json the bundle writes."""
    runtime = Preprocessing.from_metadata(preprocessing_metadata(CONFIGS[config_name], None))
    copy = bundle_predict.Preprocess(json.loads(json.dumps(preprocess_spec(runtime))))
    for photo in PHOTOS.values():
        image = Image.fromarray(photo)
        np.testing.assert_array_equal(copy(image), runtime(image))


def test_preprocessing_metadata_errors_are_model_errors():
    meta = preprocessing_metadata(REFERENCE_CFG, None)
    with pytest.raises(ModelError, match="preprocessing metadata"):
        Preprocessing.from_metadata({k: v for k, v in meta.items() if not k.endswith("mean")})
    with pytest.raises(ModelError, match="unsupported preprocessing"):
        Preprocessing.from_metadata({**meta, "vitcompress.crop_mode": "border"})


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    preprocessing = Preprocessing.from_metadata(preprocessing_metadata(REFERENCE_CFG, None))
    for name in ("empty.png", "broken.jpg"):
        with pytest.raises(DataError, match=name):
            preprocessing.load([tmp_path / name])
    with pytest.raises(DataError, match="does not exist"):
        preprocessing.load([tmp_path / "missing.png"])


def test_timing_statistics():
    timing = Timing.of([float(v) for v in range(1, 11)])
    assert timing.p50_ms == 5.5 and timing.mean_ms == 5.5 and timing.runs == 10
    assert timing.p90_ms == pytest.approx(9.1) and timing.spread == pytest.approx((9.1 - 1.9) / 5.5)


def test_measure_latency_interleaves_every_model_at_every_batch(tiny_vit_dir):
    directory, _ = tiny_vit_dir
    result = measure_latency({"a": directory / "model.onnx", "b": directory / "model.onnx"}, batch_sizes=[1, 4],
                             threads=1, runs=5, warmup=1)
    for name in ("a", "b"):
        assert set(result[name]) == {1, 4}
        b1 = result[name][1]
        assert b1["runs"] == 5 and 0 < b1["p50_ms"] <= b1["p90_ms"] and b1["spread"] >= 0


def test_run_batches_matches_torch(tiny_vit_dir):
    directory, model = tiny_vit_dir
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    (logits,) = run_batches(open_session(directory / "model.onnx"), [x[:2].numpy(), x[2:].numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)


def test_open_session_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        open_session(tmp_path / "missing.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x00not an onnx model")
    with pytest.raises(ModelError, match="does not load in onnxruntime"):
        open_session(tmp_path / "corrupt.onnx")


def run_without_torch(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The vitcompress CLI in a fresh interpreter in which ``import torch`` fails."""
    script = ("import sys; sys.modules['torch'] = None; from vitcompress.cli import main; "
              f"main({list(argv)!r}, prog_name='vitcompress')")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_importing_runtime_never_imports_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vitcompress.deploy.runtime"],
                         capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "onnxruntime" in imported and "torch" not in imported and "timm" not in imported


def test_predict_and_profile_run_with_torch_unimportable(tiny_vit_dir):
    directory, _ = tiny_vit_dir
    predicted = run_without_torch("predict", "--cascade", str(directory), "--json", "0.png", "1.png", "2.png",
                                  cwd=directory)
    assert predicted.returncode == 0, predicted.stderr
    legacy = json.loads(predicted.stdout)["predictions"]
    assert [r["image"] for r in legacy] == ["0.png", "1.png", "2.png"]
    bundle_form = run_without_torch("predict", str(directory), "0.png", "1.png", "2.png", "--json", cwd=directory)
    rows = [json.loads(line) for line in bundle_form.stdout.splitlines()]
    assert [r["path"] for r in rows] == ["0.png", "1.png", "2.png"] and all(len(r["labels"]) == 5 for r in rows)
    assert [(r["model"], r["classes"][0]) for r in rows] == [(r["model"], r["class"]) for r in legacy], \
        "the BUNDLE form runs the same cascade"
    profiled = run_without_torch("profile", str(directory), "--runs", "3", "--warmup", "1", "--json", cwd=directory)
    assert profiled.returncode == 0, profiled.stderr
    assert json.loads(profiled.stdout)["converted"]["node_ms"] > 0


@pytest.mark.parametrize("broken", ["low.onnx", "high.onnx"])
def test_predict_with_a_corrupt_cascade_model_is_one_error_line(tiny_vit_dir, tmp_path, broken):
    directory, _ = tiny_vit_dir
    for name in ("low.onnx", "high.onnx", CASCADE_FILE, "0.png"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    (tmp_path / broken).write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["predict", "--cascade", str(tmp_path), str(tmp_path / "0.png")],
                                catch_exceptions=False)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and broken in lines[0] and "Traceback" not in result.output
