import gzip

import pytest
import torch
from PIL import Image

from vitcompress.data import ImageDirectory, fmnist_dataset, load_fmnist_arrays, resolve_data
from vitcompress.errors import DataError
from vitcompress.labels import ClassSpace


def test_fashion_mnist_splits():
    images, labels = load_fmnist_arrays("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    data = fmnist_dataset("test", limit=100)
    x, y = data[0]
    assert len(data) == 100 and x.shape == (1, 28, 28) and x.dtype == torch.float32
    all_x = data.tensors[0]
    assert abs(all_x.mean().item()) < 0.2 and 0.8 < all_x.std().item() < 1.2  # normalised


def test_corrupt_and_missing_idx(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCOMPRESS_FMNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist_arrays("test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(DataError, match="corrupt"):
        load_fmnist_arrays("test")
    header = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(DataError, match="truncated"):
        load_fmnist_arrays("test")


def _write_images(root, classes, per_class=3, size=(40, 30)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (i * 40, 100, 200)).save(root / c / f"{i}.png")


def test_image_folder_labelled_and_unlabelled(tmp_path):
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 32, 32), is_training=False)
    _write_images(tmp_path / "labelled", ["cat", "dog"])
    data = ImageDirectory(tmp_path / "labelled", transform, class_index={"cat": 7, "dog": 3})
    assert data.classes == ["cat", "dog"] and len(data) == 6
    x, y = data[4]
    assert x.shape == (3, 32, 32) and y == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (20, 20)).save(flat / "a.jpg")
    x, y = ImageDirectory(flat, transform)[0]
    assert y == -1 and x.shape == (3, 32, 32)


def test_resolve_data_train_val_split(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], per_class=4)
    _write_images(tmp_path / "val", ["a", "b"], per_class=2)
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
              "crop_pct": 0.9, "crop_mode": "center"}
    bundle = resolve_data(str(tmp_path), config, val_limit=3, classes=ClassSpace.of(2, None))
    assert len(bundle.train) == 8 and len(bundle.val) == 3 and bundle.labelled
    synthetic = resolve_data("synthetic", config, val_limit=None, classes=ClassSpace.of(2, None))
    assert not synthetic.labelled and synthetic.val[0][0].shape == (3, 32, 32)
