"""Public evaluation: predictions, top-1 and latency of ONNX files in onnxruntime, and torch logits for parity.

The library that the validate stage, the cascade, ``bench/`` and the CLI measure with. Everything runs the
exported ONNX files with plain onnxruntime (CPU provider), as a deployment would; latency runs are interleaved
(original, converted, original, …) in one process so that machine noise hits both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitcompress.data import first_images
from vitcompress.deploy.runtime import (
    ENTROPY,
    INPUT_NAME,
    LOGITS,
    Preprocessing,
    measure_latency,
    open_session,
    run_batches,
)
from vitcompress.deploy.timing_lock import latency_lock
from vitcompress.recipe import ValidateConfig

TOP_K = 3  # classes per image kept for report.html (predictions.npz)
EVAL_BATCH = 32  # images per onnxruntime call over the validation set: as fast as 128 on 2 cores, less memory
PARITY_IMAGES = 256


@dataclass
class Predictions:
    """What a pass over the validation data keeps: every image's top-1 class and label, its top-``TOP_K`` classes
    and their softmax probabilities (``top_classes``, ``top_probs``: what report.html shows), and the logits of
    the first images only (for parity), so memory stays bounded by a batch whatever the size of the data."""

    classes: np.ndarray
    labels: np.ndarray
    head_logits: np.ndarray
    entropy: np.ndarray | None = None
    top_classes: np.ndarray | None = None
    top_probs: np.ndarray | None = None


def top_k(logits: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely classes of each row of ``logits`` (most likely first) and their softmax
    probabilities."""
    k = min(k, logits.shape[-1])
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.take_along_axis(shifted / shifted.sum(-1, keepdims=True), order, -1)
    return order, probs.astype(np.float32)


def ort_predictions(session: ort.InferenceSession, dataset: Dataset, progress=None, task: str = "",
                    keep_logits: int = PARITY_IMAGES, entropy: bool = False) -> Predictions:
    """Top-1 classes and labels of every image of ``dataset`` through ``session``; logits of the first
    ``keep_logits`` images; with ``entropy``, every image's value of the model's ``entropy`` output (a cascade
    model's)."""
    outputs = (LOGITS, ENTROPY) if entropy else (LOGITS,)
    classes, labels, head, entropies, tops, probs = [], [], [], [], [], []
    kept = 0
    for images, batch_labels in DataLoader(dataset, batch_size=EVAL_BATCH):
        logits, *rest = run_batches(session, [images.numpy()], outputs)
        classes.append(logits.argmax(-1))
        top, prob = top_k(logits)
        tops.append(top)
        probs.append(prob)
        labels.append(batch_labels.numpy())
        entropies += rest
        if kept < keep_logits:
            head.append(logits[: keep_logits - kept])
            kept += len(head[-1])
        if progress is not None:
            progress.advance(task, len(images))
    head_logits = np.concatenate(head) if head else np.empty((0, 0), np.float32)
    return Predictions(np.concatenate(classes), np.concatenate(labels), head_logits,
                       np.concatenate(entropies) if entropy else None, np.concatenate(tops), np.concatenate(probs))


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


def end_to_end(path: Path, files: list[Path], threads: int, runs: int = 5) -> dict:
    """Median ms per image from the image file to logits: decode, resize and normalise with ``path``'s own
    preprocessing (its ONNX metadata, as a deployed bundle does), then one onnxruntime call at batch 1; each file
    timed ``runs`` times after one warm-up pass, under the latency lock. The keys are the report's
    :class:`~vitcompress.report.EndToEnd` fields."""
    session = open_session(path, threads)
    preprocessing = Preprocessing.from_session(session)
    before, during = [], []
    with latency_lock(f"end-to-end {path}"):
        for run in range(runs + 1):
            for file in files:
                start = time.perf_counter()
                images = preprocessing.load([file])
                middle = time.perf_counter()
                session.run([LOGITS], {INPUT_NAME: images})
                if run:  # the first pass warms caches and the session up
                    before.append(middle - start)
                    during.append(time.perf_counter() - middle)
    preprocess_ms, model_ms = float(np.median(before)) * 1e3, float(np.median(during)) * 1e3
    return {"samples": len(before), "preprocess_ms": preprocess_ms, "model_ms": model_ms,
            "total_ms": preprocess_ms + model_ms, "model_share": model_ms / (preprocess_ms + model_ms)}
