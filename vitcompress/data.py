"""Datasets for calibration, fine-tuning and validation, and the data bundle a conversion resolves ``--data`` to.

Three sources, all returned as a :class:`torch.utils.data.Dataset` of ``(image tensor, label)``:

* Fashion-MNIST read from the IDX files of the Debian package ``dataset-fashion-mnist``
  (the reference model's train/test data; the test split is the validation set of every accuracy number);
* an ImageFolder directory (``DIR/<class>/<image>``), preprocessed from the model's timm data config;
* a directory of unlabelled images (label ``-1``: distillation only).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from vitcompress.deploy.runtime import IMAGE_SUFFIXES, Preprocessing
from vitcompress.errors import DataError
from vitcompress.labels import ClassSpace

FMNIST_DIR_ENV = "VITCOMPRESS_FMNIST_DIR"
FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
UNLABELLED = -1


def fmnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files live (``$VITCOMPRESS_FMNIST_DIR`` or the Debian package path)."""
    return Path(os.environ.get(FMNIST_DIR_ENV, FMNIST_DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzipped IDX file (magic, dims, big-endian sizes, uint8 payload)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(
            f"Fashion-MNIST file {path} not found: install it with "
            "`apt-get install dataset-fashion-mnist` or set $VITCOMPRESS_FMNIST_DIR"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"Fashion-MNIST file {path} is corrupt: {exc}") from None
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"Fashion-MNIST file {path} is truncated")
    return data.reshape(shape)


def load_fmnist_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N,1,28,28], labels int64 [N])`` of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = fmnist_dir()
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def normalize_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N,C,H,W] → float32 normalised with the model's mean/std."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def first_images(dataset: Dataset, limit: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The images (no labels) of the first ``limit`` items of an ``(image, label)`` dataset, in batches, in order:
    what calibration, parity and latency measurements read."""
    loader = DataLoader(Subset(dataset, range(min(limit, len(dataset)))), batch_size=batch_size, shuffle=False)
    return (images for images, _ in loader)


def fmnist_dataset(split: str, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST split, normalised as the reference model expects, optionally the first ``limit`` images."""
    images, labels = load_fmnist_arrays(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorDataset(normalize_uint8(images, FMNIST_MEAN, FMNIST_STD), labels)


class ImageDirectory(Dataset):
    """Images under a directory, preprocessed by the runtime's
    :class:`~vitcompress.deploy.runtime.Preprocessing` (timm's
    eval transform, tested equal to it): calibration, fine-tune and validation see the pixels a deployed bundle sees.

    ``DIR/<class>/<img>`` gives labelled data, each folder labelled by ``class_index`` (folder name → the
    model's class index, from :meth:`vitcompress.labels.ClassSpace.map_folders`); images directly under ``DIR``
    give unlabelled data (label -1, distillation only).
    """

    def __init__(self, root: Path, transform, in_chans: int = 3, limit: int | None = None,
                 class_index: dict[str, int] | None = None) -> None:
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        self.classes = class_folders(root)
        if self.classes:
            if class_index is None or set(self.classes) - set(class_index):
                raise DataError(f"{root}: no class index for its folders {self.classes}")
            items = [(f, class_index[name]) for name in self.classes for f in sorted((root / name).rglob("*"))
                     if _is_image(f)]
        else:
            items = [(f, UNLABELLED) for f in sorted(root.iterdir()) if _is_image(f)]
        if not items:
            raise DataError(f"data directory {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.items = items[:limit] if limit is not None else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as img:
                return torch.as_tensor(self.transform(img.convert(self.mode))), label
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {path} cannot be read: {type(exc).__name__}: {exc}") from None


def class_folders(root: Path) -> list[str]:
    """Names of the sub-directories of ``root`` (its classes, in ImageFolder layout), sorted."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise DataError(f"data directory {root} cannot be read: {exc.strerror}") from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


@dataclass
class DataBundle:
    """Images for calibration / fine-tuning (``train``) and for validation (``val``)."""

    name: str
    train: Dataset
    val: Dataset
    labelled: bool
    classes: str | None = None
    #: identifies ``val`` for as long as the process runs, for data that cannot change (the built-in sets); None:
    #: never reuse results computed on it (:mod:`vitcompress.original_cache`)
    cache_key: str | None = None


SYNTHETIC_TRAIN, SYNTHETIC_VAL = 256, 64


def resolve_data(spec: str, data_config: dict, val_limit: int | None, classes: ClassSpace,
                 labels: Mapping[str, int | str] | None = None) -> DataBundle:
    """Build the data bundle for ``spec``: 'fmnist', 'synthetic' or an image directory whose class folders are
    matched to ``classes`` (the model's), through the ``labels`` mapping first when given."""
    input_size = tuple(data_config["input_size"])
    if spec == "fmnist":
        if input_size != (1, 28, 28) or classes.count != len(FMNIST_CLASSES):
            raise DataError(f"--data fmnist needs a 1×28×28 model input and 10 classes, this model takes "
                            f"{input_size} and has {classes.count} classes")
        return DataBundle("fmnist", fmnist_dataset("train"), fmnist_dataset("test", val_limit), labelled=True,
                          cache_key=f"fmnist test {val_limit}")
    if spec == "synthetic":
        gen = torch.Generator().manual_seed(0)
        n_val = min(val_limit or SYNTHETIC_VAL, SYNTHETIC_VAL)
        images = torch.randn(SYNTHETIC_TRAIN + n_val, *input_size, generator=gen)
        labels_ = torch.full((SYNTHETIC_TRAIN + n_val,), -1)
        train = TensorDataset(images[:SYNTHETIC_TRAIN], labels_[:SYNTHETIC_TRAIN])
        val = TensorDataset(images[SYNTHETIC_TRAIN:], labels_[SYNTHETIC_TRAIN:])
        return DataBundle("synthetic (Gaussian noise: agreement only, no accuracy)", train, val, labelled=False,
                          cache_key=f"synthetic {input_size} {n_val}")
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"--data {spec!r}: not a directory, and not 'fmnist' or 'synthetic'")
    train_root, val_root = split_roots(root)
    folders = sorted(set(class_folders(train_root)) | set(class_folders(val_root)))
    class_index = classes.map_folders(folders, labels, where=f"--data {spec}") if folders else None
    transform = Preprocessing.from_data_config(data_config)  # the deployed bundle's own preprocessing
    train = ImageDirectory(train_root, transform, in_chans=input_size[0], class_index=class_index)
    val = ImageDirectory(val_root, transform, in_chans=input_size[0], limit=val_limit, class_index=class_index)
    matched = (f"{len(folders)} class folders → the model's classes by "
               f"{'the --labels mapping, then ' if labels else ''}{classes.source}") if folders else None
    return DataBundle(str(root), train, val, labelled=bool(val.classes), classes=matched)


def split_roots(root: Path) -> tuple[Path, Path]:
    """(train, val) directories of ``root``: ``root/train`` and ``root/val`` when it has them, else ``root``
    for both. One without the other is an error: the lone folder would otherwise count as a class."""
    train, val = root / "train", root / "val"
    if train.is_dir() != val.is_dir():
        have, missing = (train, val) if train.is_dir() else (val, train)
        raise DataError(f"--data {root}: has {have.name}/ but no {missing.name}/: give both DIR/train and DIR/val, "
                        f"or pass --data {have} to use the same images for calibration, fine-tune and validation")
    return (train, val) if train.is_dir() else (root, root)
