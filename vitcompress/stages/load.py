"""Stage 1 — load: the original model (teacher, frozen), the student copy, and the data.

The API may have set ``ctx.original`` (an in-memory module) and ``ctx.data`` (an in-memory dataset) already."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from vitcompress.context import DataBundle, RunContext
from vitcompress.data import FMNIST_CLASSES, ImageDirectory, class_folders, first_images, fmnist_dataset
from vitcompress.errors import DataError
from vitcompress.labels import ClassSpace
from vitcompress.models import REFERENCE_MODELS, LoadedModel, load_model
from vitcompress.runtime import Preprocessing

SYNTHETIC_TRAIN, SYNTHETIC_VAL = 256, 64


def default_data(model_name: str, random_init: bool) -> str:
    """Data used when ``--data`` is not given: the reference model's own, noise for latency-only runs."""
    if model_name in REFERENCE_MODELS:
        return "fmnist"
    if random_init:
        return "synthetic"
    raise DataError("no data given: pass --data DIR (ImageFolder layout), --data fmnist or --data synthetic")


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


def run(ctx: RunContext) -> None:
    settings = ctx.settings
    ctx.original = ctx.original or load_model(settings.model, settings.checkpoint, settings.random_init,
                                                 settings.model_args)
    ctx.original.model.requires_grad_(False)
    ctx.model = copy.deepcopy(ctx.original.model)
    ctx.data = ctx.data or load_data(ctx)
    ctx.report["model"] = {"name": ctx.original.name, "weights": ctx.original.weights,
                           "input_size": list(ctx.original.data_config["input_size"]), "source": settings.model_source,
                           "model_args": settings.model_args or None}
    ctx.report["data"] = {"name": ctx.data.name, "train_images": len(ctx.data.train),
                          "val_images": len(ctx.data.val), "labelled": ctx.data.labelled,
                          "classes": ctx.data.classes}


def load_data(ctx: RunContext) -> DataBundle:
    """The data of ``--data``, or the model's default (:func:`default_data`), for the loaded model."""
    settings = ctx.settings
    spec = settings.data or default_data(ctx.original.name, settings.random_init)
    if settings.labels is not None and spec in ("fmnist", "synthetic"):
        raise DataError(f"--labels maps the class folders of an image directory; --data {spec} has none")
    data = resolve_data(spec, ctx.original.data_config, ctx.recipe.validate_.images, model_classes(ctx.original),
                        settings.labels)
    if len(data.val) == 0:
        raise DataError(f"data {spec!r} has no validation images")
    return data


def calibration_batches(ctx: RunContext):
    """The first ``calibration.images`` training images in batches (deterministic).

    A context without data (``vitcompress plan``) loads it here, so only transforms that calibrate need it."""
    if ctx.data is None:
        ctx.data = load_data(ctx)
    cal = ctx.recipe.calibration
    return first_images(ctx.data.train, cal.images, cal.batch_size)


def model_classes(loaded: LoadedModel) -> ClassSpace:
    """The class space of a loaded model: its output count and class names (ImageNet's, for a 1000-way head)."""
    return ClassSpace.of(int(loaded.model.num_classes), loaded.class_names)
