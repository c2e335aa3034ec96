"""Public evaluation: predictions, top-1 and latency of ONNX files in onnxruntime, and torch logits for parity.

The library that the validate stage, the cascade, ``bench/`` and the CLI measure with. Everything runs the
exported ONNX files with plain onnxruntime (CPU provider), as a deployment would; latency runs are interleaved
(original, converted, original, …) in one process so that machine noise hits both alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitcompress.data import first_images
from vitcompress.deploy.runtime import ENTROPY, LOGITS, measure_latency, run_batches
from vitcompress.deploy.timing_lock import latency_lock
from vitcompress.recipe import ValidateConfig

EVAL_BATCH = 32  # images per onnxruntime call over the validation set: as fast as 128 on 2 cores, less memory
PARITY_IMAGES = 256


@dataclass
class Predictions:
    """What a pass over the validation data keeps: every image's top-1 class and label, and the logits of the
    first images only (for parity), so memory stays bounded by a batch whatever the size of the data."""

    classes: np.ndarray
    labels: np.ndarray
    head_logits: np.ndarray
    entropy: np.ndarray | None = None


def ort_predictions(session: ort.InferenceSession, dataset: Dataset, progress=None, task: str = "",
                    keep_logits: int = PARITY_IMAGES, entropy: bool = False) -> Predictions:
    """Top-1 classes and labels of every image of ``dataset`` through ``session``; logits of the first
    ``keep_logits`` images; with ``entropy``, every image's value of the model's ``entropy`` output (a cascade
    model's)."""
    outputs = (LOGITS, ENTROPY) if entropy else (LOGITS,)
    classes, labels, head, entropies = [], [], [], []
    kept = 0
    for images, batch_labels in DataLoader(dataset, batch_size=EVAL_BATCH):
        logits, *rest = run_batches(session, [images.numpy()], outputs)
        classes.append(logits.argmax(-1))
        labels.append(batch_labels.numpy())
        entropies += rest
        if kept < keep_logits:
            head.append(logits[: keep_logits - kept])
            kept += len(head[-1])
        if progress is not None:
            progress.advance(task, len(images))
    head_logits = np.concatenate(head) if head else np.empty((0, 0), np.float32)
    return Predictions(np.concatenate(classes), np.concatenate(labels), head_logits,
                       np.concatenate(entropies) if entropy else None)


def torch_logits(model: nn.Module, dataset: Dataset, limit: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(images).numpy() for images in first_images(dataset, limit, EVAL_BATCH)])


def latency_images(dataset: Dataset, count: int) -> np.ndarray:
    """``count`` validation images (repeated if the set is smaller) to time the models on: a model with a token
    router (MoE) does data-dependent work, so it is timed on real inputs, not noise."""
    images = np.concatenate([batch.numpy() for batch in first_images(dataset, count, EVAL_BATCH)])
    return np.resize(images, (count, *images.shape[1:]))


def latency(paths: dict[str, Path], config: ValidateConfig, images: np.ndarray | None = None,
            runs: int | None = None) -> dict[str, dict]:
    """:func:`vitcompress.deploy.runtime.measure_latency` with the recipe's threads, batch sizes, runs and warm-up
    (``runs`` overrides the recipe's ``latency_runs``), holding the machine's latency lock under ``vitcompress
    batch`` (:mod:`vitcompress.deploy.timing_lock`) so that parallel jobs never time their models at once."""
    with latency_lock("latency " + ", ".join(paths)):
        return measure_latency(paths, batch_sizes=config.batch_sizes, threads=config.threads,
                               runs=runs or config.latency_runs, warmup=config.warmup_runs, images=images)


def top1(classes: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy (%) of predicted ``classes`` over the labelled images (label ≥ 0); None without labels."""
    mask = labels >= 0
    return float((classes[mask] == labels[mask]).mean() * 100) if mask.any() else None
