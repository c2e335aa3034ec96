"""Stage 5 — validate: onnxruntime accuracy, agreement, parity and latency, original vs converted.

Everything is measured on the exported ONNX files with plain onnxruntime (CPU provider), as a deployment
would run them. Latency runs are interleaved (original, converted, original, …) in one process so that
machine noise hits both alike; the report gives medians and p90 over the runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitcompress.context import RunContext
from vitcompress.data import first_images
from vitcompress.layers.moe_linear import expert_shares
from vitcompress.recipe import ValidateConfig
from vitcompress.runtime import ENTROPY, LOGITS, measure_latency, open_session, run_batches
from vitcompress.stages import original_memo
from vitcompress.stages.measure import count_macs, count_params
from vitcompress.timing_lock import latency_lock

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
    """:func:`vitcompress.runtime.measure_latency` with the recipe's threads, batch sizes, runs and warm-up
    (``runs`` overrides the recipe's ``latency_runs``), holding the machine's latency lock under ``vitcompress
    batch`` (:mod:`vitcompress.timing_lock`) so that parallel jobs never time their models at once."""
    with latency_lock("latency " + ", ".join(paths)):
        return measure_latency(paths, batch_sizes=config.batch_sizes, threads=config.threads,
                               runs=runs or config.latency_runs, warmup=config.warmup_runs, images=images)


def top1(classes: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy (%) of predicted ``classes`` over the labelled images (label ≥ 0); None without labels."""
    mask = labels >= 0
    return float((classes[mask] == labels[mask]).mean() * 100) if mask.any() else None


def original_predictions(ctx: RunContext, session: ort.InferenceSession) -> Predictions:
    """The original's predictions on the validation data; the same file on the same built-in data set earlier
    in this process is not run again (:mod:`~vitcompress.stages.original_memo`)."""
    data, threads = ctx.data.val, ctx.recipe.validate_.threads
    key = (None if ctx.data.cache_key is None else
           repr((original_memo.file_digest(ctx.original_onnx_path), ctx.data.cache_key, len(data), threads)))
    predictions, kept = original_memo.predicted(key, lambda: ort_predictions(session, data, ctx.progress, "accuracy"))
    if kept:
        ctx.progress.advance("accuracy", len(data))
    return predictions


def run(ctx: RunContext) -> None:
    config = ctx.recipe.validate_
    input_size = tuple(ctx.original.data_config["input_size"])
    data = ctx.data.val
    ctx.progress.stage("validate", f"onnxruntime on {len(data)} images, {config.threads} threads")
    sessions = {"original": open_session(ctx.original_onnx_path, config.threads),
                "converted": open_session(ctx.onnx_path, config.threads)}
    ctx.progress.start("accuracy", 2 * len(data))
    predictions = {"original": original_predictions(ctx, sessions["original"]),
                   "converted": ort_predictions(sessions["converted"], data, ctx.progress, "accuracy")}
    ctx.progress.finish("accuracy")
    labels = predictions["original"].labels
    parity = {}
    quantize = ctx.recipe.export.quantize
    for name, model in (("original", ctx.original.model), ("converted", ctx.model)):
        reference = torch_logits(model, data, PARITY_IMAGES)
        got = predictions[name].head_logits
        parity[name] = {"max_abs_diff": float(np.abs(reference - got).max()),
                        "top1_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
                        "images": len(reference),
                        "onnx": f"int8 {quantize}" if name == "converted" and quantize != "none" else "float32"}
    ctx.progress.stage("latency", f"batch sizes {config.batch_sizes}, {config.latency_runs} interleaved runs")
    timing = latency({"original": ctx.original_onnx_path, "converted": ctx.onnx_path}, config,
                     latency_images(data, max(config.batch_sizes)))
    models = {"original": ctx.original.model, "converted": ctx.model}
    table = {}
    for name, model in models.items():
        table[name] = {
            "params": count_params(model), "macs": count_macs(model, input_size),
            "top1": top1(predictions[name].classes, labels), "latency": timing[name], "parity": parity[name],
        }
    agreement = float((predictions["converted"].classes == predictions["original"].classes).mean())
    table["converted"]["agreement"] = agreement
    table["original"]["agreement"] = 1.0
    ctx.report["validation"] = {"images": len(data), "threads": config.threads, "models": table,
                                "gates": gates(table, config)}
    shares = expert_shares(ctx.model, first_images(data, PARITY_IMAGES, EVAL_BATCH))
    if shares is not None:
        ctx.report["validation"]["expert_shares"] = {"images": min(PARITY_IMAGES, len(data)), **shares}


def gates(table: dict, config: ValidateConfig) -> list[dict]:
    """Each configured gate with its measured value and whether it passed."""
    converted, original = table["converted"], table["original"]
    result = [{"gate": "max_abs_diff", "limit": config.max_abs_diff,
               "value": converted["parity"]["max_abs_diff"],
               "passed": converted["parity"]["max_abs_diff"] <= config.max_abs_diff}]
    onnx = converted["parity"].get("onnx", "float32")
    if onnx != "float32":
        result[0]["note"] = f"torch float32 vs the {onnx} ONNX model"
    if config.max_top1_drop is not None and original["top1"] is None:
        result.append({"gate": "max_top1_drop", "limit": config.max_top1_drop, "value": None, "passed": None,
                       "note": "skipped: the validation data has no labels"})
    elif config.max_top1_drop is not None:
        drop = original["top1"] - converted["top1"]
        result.append({"gate": "max_top1_drop", "limit": config.max_top1_drop, "value": drop,
                       "passed": drop <= config.max_top1_drop})
    if config.min_agreement is not None:
        result.append({"gate": "min_agreement", "limit": config.min_agreement, "value": converted["agreement"],
                       "passed": converted["agreement"] >= config.min_agreement})
    return result
