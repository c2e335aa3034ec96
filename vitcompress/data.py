"""Datasets for calibration, fine-tuning and validation.

Three sources, all returned as a :class:`torch.utils.data.Dataset` of ``(image tensor, label)``:

* Fashion-MNIST read from the IDX files of the Debian package ``dataset-fashion-mnist``
  (the reference model's train/test data; the test split is the validation set of every accuracy number);
* an ImageFolder directory (``DIR/<class>/<image>``), preprocessed from the model's timm data config;
* a directory of unlabelled images (label ``-1``: distillation only).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from vitcompress.errors import DataError

FMNIST_DIR_ENV = "VITCOMPRESS_FMNIST_DIR"
FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
UNLABELLED = -1
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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
    """Images under a directory, preprocessed by the runtime's :class:`~vitcompress.runtime.Preprocessing` (timm's
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
            raise DataError(f"data directory {root} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
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
    return path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
