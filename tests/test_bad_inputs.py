"""The bad-input corpus (tests/bad_inputs/): every case ends with one `error:` line naming the problem, exit
code 2, no traceback, nothing written and no input file touched; the valid-but-unusual inputs succeed."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from tests.bad_inputs.cases import ACCEPTED, CASES, MARKER, Case
from vitcompress.cli import main
from vitcompress.deploy.runtime import CASCADE_FILE, preprocessing_metadata
from vitcompress.export import export_onnx
from vitcompress.layers.entropy import WithEntropy

CORPUS = Path(__file__).parent / "bad_inputs"
RECIPE_FILES = sorted((CORPUS / "recipes").glob("*.yaml"))
OK_RECIPE = CORPUS / "tiny_svd.yaml"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> Path:
    """A valid cascade directory (and bundle) of a small real ViT on 32×32 RGB images."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=2).eval()
    directory = tmp_path_factory.mktemp("cascade")
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
              "crop_pct": 0.9, "crop_mode": "center"}
    meta = preprocessing_metadata(config, ["a", "b", "c", "d"])
    export_onnx(model, directory / "model.onnx", input_size=(3, 32, 32), metadata=meta)
    for name in ("low", "high"):
        export_onnx(WithEntropy(model), directory / f"{name}.onnx", input_size=(3, 32, 32), metadata=meta,
                    output_names=("logits", "entropy"))
    (directory / CASCADE_FILE).write_text(json.dumps({"low": "low.onnx", "high": "high.onnx", "threshold": 0.5}))
    Image.new("RGB", (40, 30), (200, 10, 10)).save(directory / "0.png")
    return directory


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (not following links), files with a hash of their content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def run(case: Case, tmp: Path, cascade: Path):
    if any("{tmp}/c" in a for a in case.args):
        shutil.copytree(cascade, tmp / "c")
    if case.setup is not None:
        case.setup(tmp)
    args = [a.format(tmp=tmp, ok=OK_RECIPE, cascade=cascade, bundle=cascade) for a in case.args]
    before = snapshot(tmp), snapshot(cascade)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result, before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, tmp_path, cascade):
    result, (files, cascade_files) = run(case, tmp_path, cascade)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    assert sum(line.startswith("error") for line in lines) == 1, result.output
    assert case.expect in lines[-1], lines[-1]
    assert snapshot(tmp_path) == files and snapshot(cascade) == cascade_files, "an input or output file changed"
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())
    assert not (tmp_path / MARKER).exists(), "the checkpoint's pickle ran code"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_bad_recipe_file_is_one_error_line_exit_2_and_nothing_written(path, tmp_path):
    expect = path.read_bytes().split(b"\n", 1)[0].decode().removeprefix("# expect: ")
    recipe = tmp_path / path.name
    recipe.write_bytes(path.read_bytes())
    result = CliRunner().invoke(main, ["convert", "test_vit", "--random-init", "--recipe", str(recipe), "--out",
                                       str(tmp_path / "out")], catch_exceptions=False)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: ") and expect in lines[-1], lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "something was written"


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_unusual_but_valid_images_are_classified(case, tmp_path, cascade):
    result, _ = run(case, tmp_path, cascade)
    assert result.exit_code == 0, result.output


def test_the_corpus_is_large_enough():
    assert len(CASES) + len(RECIPE_FILES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert np.all([p.read_bytes().startswith(b"# expect: ") for p in RECIPE_FILES])
