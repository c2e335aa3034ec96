"""The accuracy ladder and the per-image file of report.html: each model of a run on the same held-out images.

A rung is one pass of one model (torch or onnxruntime) over the first ``validate.ladder_images`` validation
images, timed: the original, the transformed model before fine-tuning, the fine-tuned one, its float32 ONNX and its
int8 ONNX. Each is compared with the original (torch) on the same images (top-1 agreement, mean |Δ logits|), so a
user sees whether accuracy went in the transform, the fine-tune, the export or the int8 step.

``predictions.npz`` keeps what the page needs to be rebuilt without a model (``vitcompress report``): every
validation image's top-k classes and probabilities under the original and the converted ONNX (the validation's own
pass), its label, and each rung's top-1 classes; thumbnails of the first disagreements go to ``report/``.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitcompress.data import ImageDirectory
from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, open_session
from vitcompress.evaluate import EVAL_BATCH, Predictions, top1
from vitcompress.report import Rung, Shown

PREDICTIONS = "predictions.npz"
THUMBNAILS = "report"
MAX_SHOWN = 16
#: Longest side of a disagreement thumbnail (pixels): 16 of them stay well under 1 MB in the page.
THUMBNAIL = 128
#: Rung → (label, runtime), in ladder order.
RUNGS = {"original": ("original (torch)", "torch"), "transformed": ("transformed, before fine-tune (torch)", "torch"),
         "finetuned": ("fine-tuned (torch)", "torch"), "onnx_fp32": ("ONNX float32 (onnxruntime)", "onnxruntime"),
         "quantized": ("ONNX int8 (onnxruntime)", "onnxruntime")}


@dataclass
class RungPass:
    """One model's logits on the ladder images, their labels and the seconds the pass took."""

    logits: np.ndarray
    labels: np.ndarray
    seconds: float


def _batches(dataset: Dataset, images: int) -> DataLoader:
    return DataLoader(Subset(dataset, range(min(images, len(dataset)))), batch_size=EVAL_BATCH, shuffle=False)


def torch_pass(model: nn.Module, dataset: Dataset, images: int) -> RungPass:
    """``model`` (in eval mode, no gradients) on the first ``images`` images of ``dataset``."""
    start = time.perf_counter()
    logits, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch, batch_labels in _batches(dataset, images):
            logits.append(model(batch).float().numpy())
            labels.append(batch_labels.numpy())
    return RungPass(np.concatenate(logits), np.concatenate(labels), time.perf_counter() - start)


def onnx_pass(path: Path, dataset: Dataset, images: int, threads: int) -> RungPass:
    """The ONNX file at ``path`` in onnxruntime (CPU, ``threads``) on the first ``images`` images of ``dataset``."""
    start = time.perf_counter()
    session = open_session(path, threads)
    logits, labels = [], []
    for batch, batch_labels in _batches(dataset, images):
        logits.append(session.run([LOGITS], {INPUT_NAME: batch.numpy()})[0])
        labels.append(batch_labels.numpy())
    return RungPass(np.concatenate(logits), np.concatenate(labels), time.perf_counter() - start)


def rung(name: str, measured: RungPass | str, original: RungPass | None) -> Rung:
    """The report's rung ``name``: measured (compared with ``original``, the original's torch pass) or skipped
    (``measured`` is then the reason)."""
    label, runtime = RUNGS[name]
    if isinstance(measured, str) or original is None:
        return Rung(name=name, label=label, runtime=runtime,
                    skipped=measured if isinstance(measured, str) else "the original was not measured")
    classes = measured.logits.argmax(-1)
    return Rung(name=name, label=label, runtime=runtime, images=len(classes), top1=top1(classes, measured.labels),
                agreement=float((classes == original.logits.argmax(-1)).mean()),
                logit_gap=float(np.abs(measured.logits - original.logits).mean()), seconds=measured.seconds)


def disagreements(predictions: dict[str, Predictions]) -> np.ndarray:
    """Positions of the validation images whose top-1 differs between the original and the converted ONNX."""
    return np.flatnonzero(predictions["original"].classes != predictions["converted"].classes)


def write_predictions(path: Path, predictions: dict[str, Predictions], passes: dict[str, RungPass]) -> None:
    """``predictions.npz``: labels, each model's top-k classes and probabilities (int32 / float16) over the
    validation images, and each rung's top-1 classes over the ladder images (``rung_<name>``)."""
    arrays = {"labels": predictions["original"].labels.astype(np.int32)}
    for name, predicted in predictions.items():
        arrays[f"{name}_top"] = predicted.top_classes.astype(np.int32)
        arrays[f"{name}_prob"] = predicted.top_probs.astype(np.float16)
    for name, measured in passes.items():
        arrays[f"rung_{name}"] = measured.logits.argmax(-1).astype(np.int32)
    np.savez_compressed(path, **arrays)


def input_image(tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                size: int | None = None) -> bytes:
    """A PNG of one model input (C, H, W) as the model saw it: un-normalised with ``mean``/``std``, clipped; with
    ``size``, shrunk to fit ``size`` × ``size`` pixels."""
    from PIL import Image

    channels = tensor.shape[0]
    levels = tensor.float() * torch.tensor(std).view(channels, 1, 1) + torch.tensor(mean).view(channels, 1, 1)
    pixels = (levels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    if size is not None:
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def input_images(dataset: Dataset, positions: list[int], data_config: dict, size: int | None = None) -> list[bytes]:
    """PNGs of the validation images at ``positions`` as the model saw them (:func:`input_image`)."""
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    return [input_image(dataset[int(i)][0], mean, std, size) for i in positions]


def image_name(dataset: Dataset, position: int) -> str:
    """What to call validation image ``position``: its file (relative to the data directory) or its number."""
    if isinstance(dataset, ImageDirectory):
        return Path(dataset.items[position][0]).relative_to(dataset.root).as_posix()
    return f"validation image {position}"


def write_thumbnails(directory: Path, dataset: Dataset, positions: np.ndarray, data_config: dict) -> list[Shown]:
    """PNGs of the first :data:`MAX_SHOWN` images at ``positions`` in ``directory/report/``, named
    ``<position>.png``; returns what the report lists of each."""
    chosen = [int(i) for i in positions[:MAX_SHOWN]]
    if chosen:
        (directory / THUMBNAILS).mkdir(exist_ok=True)
    shown = []
    for position, png in zip(chosen, input_images(dataset, chosen, data_config, THUMBNAIL)):
        shown.append(Shown(position=position, thumbnail=f"{THUMBNAILS}/{position}.png",
                           source=image_name(dataset, position)))
        (directory / shown[-1].thumbnail).write_bytes(png)
    return shown

