"""Stage 7 — bundle: the deployment files of :mod:`vitcompress.deploy.bundle` next to the models, checksums last.

The golden inputs are the first validation images exactly as the validation fed them to the models (timm's
eval transform for an image directory), so ``vitcompress verify`` re-running onnxruntime's preprocessing on
the stored source images checks the deployment preprocessing against the one the model was validated with.
Source images are stored when they are known: the files of an image directory, or images that are whole grey
levels at the input size (Fashion-MNIST), written as PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vitcompress.context import RunContext
from vitcompress.data import ImageDirectory, first_images
from vitcompress.deploy.bundle import GOLDEN_IMAGES, write_bundle
from vitcompress.deploy.optimize import optimize_offline
from vitcompress.deploy.runtime import Preprocessing, open_session

#: Source images larger than this (in all) are not copied into the bundle.
MAX_IMAGE_BYTES = 8 << 20


def source_images(dataset, inputs: np.ndarray, preprocessing: Preprocessing) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the images ``inputs`` came from, or [] when they cannot be recovered."""
    if isinstance(dataset, ImageDirectory):  # the files themselves
        paths = [Path(path) for path, _ in dataset.items[: len(inputs)]]
        if sum(p.stat().st_size for p in paths) > MAX_IMAGE_BYTES:
            return []
        return [(p.name, p.read_bytes()) for p in paths]
    return whole_grey_level_images(inputs, preprocessing)


def whole_grey_level_images(inputs: np.ndarray, preprocessing: Preprocessing) -> list[tuple[str, bytes]]:
    """PNGs of ``inputs`` when each is an image of whole grey levels at the input size (un-normalised), else []."""
    from PIL import Image

    if inputs.shape[1] not in (1, 3):
        return []
    mean = np.asarray(preprocessing.mean, dtype=np.float64)[None, :, None, None]
    std = np.asarray(preprocessing.std, dtype=np.float64)[None, :, None, None]
    levels = (inputs.astype(np.float64) * std + mean) * 255
    rounded = np.round(levels)
    if np.abs(levels - rounded).max() > 1e-3 or rounded.min() < 0 or rounded.max() > 255:
        return []
    files = []
    for image in rounded.astype(np.uint8).transpose(0, 2, 3, 1):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        files.append(("image.png", buffer.getvalue()))
    return files


def run(ctx: RunContext) -> None:
    ctx.progress.stage("bundle", "golden inputs and logits, preprocess.json, labels.txt, predict.py, SHA256SUMS")
    inputs = np.concatenate([b.numpy() for b in first_images(ctx.data.val, GOLDEN_IMAGES, GOLDEN_IMAGES)])
    preprocessing = Preprocessing.from_session(open_session(ctx.onnx_path))
    images = source_images(ctx.data.val, inputs, preprocessing)
    validate = ctx.recipe.validate_
    latency = ctx.report.validation.models["converted"].latency
    write_bundle(ctx.work_dir, inputs, images, threads=validate.threads,
                 latency={batch: timing.model_dump() for batch, timing in latency.items()})
    deploy = ctx.settings.deploy
    if deploy.optimize_offline or deploy.ort_format:
        ctx.progress.stage("optimize", f"offline: {deploy.optimize_offline or 'no'} model.opt.onnx, "
                                       f"ORT format {'yes' if deploy.ort_format else 'no'}")
        with ctx.clock.part("optimize"):
            optimize_offline(ctx.work_dir, deploy.optimize_offline, for_this_machine=deploy.for_this_machine,
                             ort_format=deploy.ort_format)
