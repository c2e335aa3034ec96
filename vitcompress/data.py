"""Datasets for calibration, fine-tuning and validation, and the data bundle a conversion resolves ``--data`` to.

Three sources, all returned as a :class:`torch.utils.data.Dataset` of ``(image tensor, label)``:

* Fashion-MNIST read from the IDX files of the Debian package ``dataset-fashion-mnist``
  (the reference model's train/test data; the test split is the validation set of every accuracy number);
* an ImageFolder directory (``DIR/<class>/<image>``), preprocessed from the model's timm data config;
* a directory of unlabelled images (label ``-1``: distillation only).

One image directory without ``train/`` and ``val/`` is split (:func:`split_held_out`): a seeded, stratified
held-out part validates, the rest calibrates and fine-tunes, so the images that choose a model never judge it.
"""

from __future__ import annotations

import copy
import gzip
import os
from collections.abc import Iterator, Mapping, Sequence
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
#: The seed of the held-out split of one image directory (fixed: the same directory always splits the same way).
HOLDOUT_SEED = 0
DEFAULT_HOLDOUT_FRACTION = 0.2


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
        self.root = root
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

    def select(self, indices: Sequence[int]) -> ImageDirectory:
        """The same directory, preprocessing and classes, holding only the items at ``indices`` (in that order)."""
        part = copy.copy(self)
        part.items = [self.items[i] for i in indices]
        return part

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
class Split:
    """How a bundle's train and validation images were separated (``report.json`` → ``data.split``).

    ``kind``: ``held-out`` (one directory split by :func:`split_held_out`), ``directories`` (``DIR/train`` and
    ``DIR/val``), ``built-in`` (the dataset's own split: Fashion-MNIST train/test, synthetic noise). For a held-out
    split, ``per_class`` maps each class folder (``""`` for unlabelled images) to its ``(train, held-out)`` counts;
    ``held_out_images`` counts the held-out part before ``validate.images`` limits it."""

    kind: str
    seed: int | None = None
    holdout_fraction: float | None = None
    held_out_images: int | None = None
    per_class: dict[str, tuple[int, int]] | None = None


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
    #: how ``train`` and ``val`` were kept apart (``report.json`` → ``data.split``); None for in-memory datasets
    split: Split | None = None
    #: class index → the class folder that holds it (an image directory's; None for other data)
    folder_names: dict[int, str] | None = None


SYNTHETIC_TRAIN, SYNTHETIC_VAL = 256, 64


def resolve_data(spec: str, data_config: dict, val_limit: int | None, classes: ClassSpace,
                 labels: Mapping[str, int | str] | None = None,
                 holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> DataBundle:
    """Build the data bundle for ``spec``: 'fmnist', 'synthetic' or an image directory whose class folders are
    matched to ``classes`` (the model's), through the ``labels`` mapping first when given. One directory without
    ``train/`` and ``val/`` is split, ``holdout_fraction`` of each class validating (:func:`split_held_out`)."""
    input_size = tuple(data_config["input_size"])
    if spec == "fmnist":
        if input_size != (1, 28, 28) or classes.count != len(FMNIST_CLASSES):
            raise DataError(f"--data fmnist needs a 1×28×28 model input and 10 classes, this model takes "
                            f"{input_size} and has {classes.count} classes")
        return DataBundle("fmnist", fmnist_dataset("train"), fmnist_dataset("test", val_limit), labelled=True,
                          cache_key=f"fmnist test {val_limit}", split=Split("built-in"))
    if spec == "synthetic":
        gen = torch.Generator().manual_seed(0)
        n_val = min(val_limit or SYNTHETIC_VAL, SYNTHETIC_VAL)
        images = torch.randn(SYNTHETIC_TRAIN + n_val, *input_size, generator=gen)
        labels_ = torch.full((SYNTHETIC_TRAIN + n_val,), -1)
        train = TensorDataset(images[:SYNTHETIC_TRAIN], labels_[:SYNTHETIC_TRAIN])
        val = TensorDataset(images[SYNTHETIC_TRAIN:], labels_[SYNTHETIC_TRAIN:])
        return DataBundle("synthetic (Gaussian noise: agreement only, no accuracy)", train, val, labelled=False,
                          cache_key=f"synthetic {input_size} {n_val}", split=Split("built-in"))
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"--data {spec!r}: not a directory, and not 'fmnist' or 'synthetic'")
    roots = split_roots(root)
    folders = sorted(set().union(*(class_folders(part) for part in roots or (root,))))
    class_index = classes.map_folders(folders, labels, where=f"--data {spec}") if folders else None
    transform = Preprocessing.from_data_config(data_config)  # the deployed bundle's own preprocessing
    if roots is None:
        images = ImageDirectory(root, transform, in_chans=input_size[0], class_index=class_index)
        train, val, split = split_held_out(images, holdout_fraction, val_limit)
    else:
        train = ImageDirectory(roots[0], transform, in_chans=input_size[0], class_index=class_index)
        val = ImageDirectory(roots[1], transform, in_chans=input_size[0], limit=val_limit, class_index=class_index)
        split = Split("directories")
    matched = (f"{len(folders)} class folders → the model's classes by "
               f"{'the --labels mapping, then ' if labels else ''}{classes.source}") if folders else None
    folder_names = {index: folder for folder, index in (class_index or {}).items()}
    return DataBundle(str(root), train, val, labelled=bool(val.classes), classes=matched, split=split,
                      folder_names=folder_names if len(folder_names) == len(class_index or {}) else None)


def split_held_out(images: ImageDirectory, fraction: float, val_limit: int | None = None,
                   seed: int = HOLDOUT_SEED) -> tuple[ImageDirectory, ImageDirectory, Split]:
    """Split one directory's images into (train, held-out validation, :class:`Split`), never sharing an image.

    Stratified: each class folder (or the unlabelled images, as one group) holds out ``round(fraction × its
    images)`` chosen by a generator seeded with ``seed``, at least one and never all, so a class needs 2 images.
    The train part keeps the directory's order; the held-out part is in the seeded order, so ``val_limit``
    (``validate.images``) keeps a random sample of it and leaves the train part as it is."""
    groups: dict[str, list[int]] = {}
    for index, (path, _) in enumerate(images.items):
        groups.setdefault(path.relative_to(images.root).parts[0] if images.classes else "", []).append(index)
    rng = np.random.default_rng(seed)
    held_out: list[int] = []
    per_class: dict[str, tuple[int, int]] = {}
    for name, members in groups.items():
        if len(members) < 2:
            what = f"class folder {name!r} has {len(members)} image" if name else \
                f"has {len(members)} unlabelled image"
            raise DataError(f"--data {images.root}: {what}, too few for a held-out split (each class needs 2: one "
                            f"to train on, one to validate); add images or give DIR/train and DIR/val")
        n_held = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held_out += [members[i] for i in rng.permutation(len(members))[:n_held]]
        per_class[name] = (len(members) - n_held, n_held)
    chosen = set(held_out)
    train = images.select([i for i in range(len(images)) if i not in chosen])
    held_out = [held_out[i] for i in rng.permutation(len(held_out))]
    val = images.select(held_out[:val_limit] if val_limit is not None else held_out)
    return train, val, Split("held-out", seed, fraction, len(held_out), per_class)


def split_roots(root: Path) -> tuple[Path, Path] | None:
    """(train, val) directories of ``root``: ``root/train`` and ``root/val`` when it has them, else None (one
    directory, to be split). One without the other is an error: the lone folder would otherwise count as a class."""
    train, val = root / "train", root / "val"
    if train.is_dir() != val.is_dir():
        have, missing = (train, val) if train.is_dir() else (val, train)
        raise DataError(f"--data {root}: has {have.name}/ but no {missing.name}/: give both DIR/train and DIR/val, "
                        f"or pass --data {have} to split its images into a train and a held-out validation part")
    return (train, val) if train.is_dir() else None


class ImageLabel(Dataset):
    """A dataset of ``(image, label)``, ``(image,)`` or images, seen as ``(image, label)`` (label −1: none)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            return item, UNLABELLED
        return item[0], int(item[1]) if len(item) > 1 else UNLABELLED


def in_memory_bundle(data: Dataset | tuple[Dataset, Dataset], val_limit: int | None) -> DataBundle:
    """Train and validation sets from one in-memory Dataset (both) or a ``(train, val)`` pair."""
    pair = isinstance(data, tuple)
    train, val = data if pair else (data, data)
    for part in (train, val):
        if not isinstance(part, Dataset) or not hasattr(part, "__len__"):
            raise DataError(f"data: expected 'fmnist', 'synthetic', a directory, a torch Dataset with a length or "
                            f"a (train, val) pair of them, got {type(part).__name__}")
        if len(part) == 0:
            raise DataError("data: the dataset is empty")
    train, val = ImageLabel(train), ImageLabel(val)
    if val_limit is not None:
        val = Subset(val, range(min(val_limit, len(val))))
    name = "in-memory datasets (train, val)" if pair else "in-memory dataset (fine-tuned and validated on)"
    return DataBundle(name, train, val, labelled=val[0][1] != UNLABELLED)
