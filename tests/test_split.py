"""One image directory is split into a train part and a seeded, stratified held-out validation part."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vitcompress
from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.data import DEFAULT_HOLDOUT_FRACTION, FMNIST_CLASSES, HOLDOUT_SEED, resolve_data
from vitcompress.errors import DataError
from vitcompress.labels import ClassSpace
from vitcompress.recipe import ValidateConfig
from vitcompress.report import DataInfo, Report

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
          "crop_pct": 0.9, "crop_mode": "center"}
THREE = ClassSpace.of(3, None)


def write_images(root, counts: dict[str, int], size=(28, 28)) -> None:
    """``counts``: class folder → images ('' writes them directly under ``root``: unlabelled)."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(root / name / f"{i}.png")


def paths(dataset) -> list[str]:
    return [str(path) for path, _ in dataset.items]


def split(root, classes=THREE, **kwargs):
    return resolve_data(str(root), CONFIG, kwargs.pop("val_limit", None), classes, **kwargs)


def test_parts_are_disjoint_and_cover_the_directory(tmp_path):
    write_images(tmp_path, {"0": 10, "1": 7, "2": 3})
    bundle = split(tmp_path)
    train, val = paths(bundle.train), paths(bundle.val)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(str(p) for p in tmp_path.rglob("*.png"))
    assert bundle.labelled and bundle.split.kind == "held-out"


def test_each_class_keeps_its_share(tmp_path):
    write_images(tmp_path, {"0": 10, "1": 7, "2": 3})
    bundle = split(tmp_path, holdout_fraction=0.3)
    # round(0.3 × n), at least one image on each side
    assert bundle.split.per_class == {"0": (7, 3), "1": (5, 2), "2": (2, 1)}
    held = {name: sum(f"/{name}/" in p for p in paths(bundle.val)) for name in "012"}
    assert held == {"0": 3, "1": 2, "2": 1}
    assert bundle.split.held_out_images == 6 and len(bundle.train) == 14
    assert bundle.split.seed == HOLDOUT_SEED and bundle.split.holdout_fraction == 0.3


def test_same_seed_same_split(tmp_path):
    write_images(tmp_path, {"0": 9, "1": 9})
    first, again = split(tmp_path), split(tmp_path)
    assert paths(first.val) == paths(again.val) and paths(first.train) == paths(again.train)
    assert paths(first.train) == sorted(paths(first.train)), "the train part keeps the directory's order"


def test_validate_images_limits_the_held_out_part_only(tmp_path):
    write_images(tmp_path, {"0": 10, "1": 10})
    whole, limited = split(tmp_path), split(tmp_path, val_limit=3)
    assert paths(limited.val) == paths(whole.val)[:3] and paths(limited.train) == paths(whole.train)
    assert limited.split.held_out_images == 4


def test_unlabelled_images_split_uniformly(tmp_path):
    write_images(tmp_path, {"": 10})
    bundle = split(tmp_path, holdout_fraction=0.5)
    assert not bundle.labelled and len(bundle.train) == 5 and len(bundle.val) == 5
    assert bundle.split.per_class == {"": (5, 5)} and not set(paths(bundle.train)) & set(paths(bundle.val))


def test_train_and_val_directories_are_not_split(tmp_path):
    write_images(tmp_path / "train", {"0": 4})
    write_images(tmp_path / "val", {"0": 2})
    bundle = split(tmp_path)
    assert len(bundle.train) == 4 and len(bundle.val) == 2 and bundle.split.kind == "directories"
    assert split("synthetic").split.kind == "built-in"


@pytest.mark.parametrize("counts, message", [
    ({"0": 5, "1": 1}, r"--data .*: class folder '1' has 1 image, too few for a held-out split"),
    ({"": 1}, "has 1 unlabelled image, too few"),
])
def test_too_few_images_to_split(tmp_path, counts, message):
    write_images(tmp_path, counts)
    with pytest.raises(DataError, match=message):
        split(tmp_path)


def test_holdout_fraction_is_a_strict_recipe_setting():
    assert ValidateConfig().holdout_fraction == DEFAULT_HOLDOUT_FRACTION
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError):
            ValidateConfig(holdout_fraction=bad)


def test_reports_without_a_split_still_load():
    info = DataInfo(name="d", train_images=1, val_images=1, labelled=False)
    assert info.split is None and DataInfo.model_validate_json(info.model_dump_json()) == info


def test_convert_records_the_split(tmp_path):
    data = tmp_path / "images"
    write_images(data, {name.replace("/", "_"): 5 for name in FMNIST_CLASSES})
    result = vitcompress.convert("vit_fmnist", "svd", data=str(data), out_dir=tmp_path / "out", random_init=True,
                                 model_args={"depth": 2}, overrides=[*FAST, "validate.holdout_fraction=0.4"])
    report = Report.load(result.out_dir / "report.json")
    assert report.data.train_images == 30 and report.data.val_images == 20
    assert report.data.split.kind == "held-out" and report.data.split.holdout_fraction == 0.4
    assert report.data.split.per_class["coat"] == (3, 2)
    assert json.loads((result.out_dir / "report.json").read_text())["data"]["split"]["seed"] == HOLDOUT_SEED
    assert "- split: 40 % of each of 10 class folders held out for validation (20 images, seed 0)" in \
        (result.out_dir / "report.md").read_text()


def test_cli_too_few_images_is_one_error_line(tmp_path):
    data = tmp_path / "images"
    write_images(data, {"trouser": 3, "sandal": 1})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--recipe", "svd", "--random-init", "--data",
                                       str(data), "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "class folder 'sandal' has 1 image" in errors[0] and str(data) in errors[0]
    assert not out.exists()
