"""Stage 5 — validate: onnxruntime accuracy, agreement, parity and latency, original vs converted.

Everything is measured on the exported ONNX files with plain onnxruntime (CPU provider), as a deployment
would run them. Latency runs are interleaved (original, converted, original, …) in one process so that
machine noise hits both alike; the report gives medians and p90 over the runs.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from vitcompress.context import RunContext
from vitcompress.data import first_images
from vitcompress.deploy.runtime import open_session
from vitcompress.evaluate import (
    EVAL_BATCH,
    PARITY_IMAGES,
    Predictions,
    latency,
    latency_images,
    ort_predictions,
    top1,
    torch_logits,
)
from vitcompress.ladder import torch_pass
from vitcompress.layers.moe_linear import expert_shares
from vitcompress.measure import count_macs, count_params
from vitcompress.original_cache import file_digest
from vitcompress.recipe import ValidateConfig
from vitcompress.report import Gate, ModelMetrics, Validation


def original_predictions(ctx: RunContext, session: ort.InferenceSession) -> Predictions:
    """The original's predictions on the validation data; the same file on the same built-in data set earlier
    in this process is not run again (``ctx.cache``, an :class:`~vitcompress.original_cache.OriginalCache`)."""
    data, threads = ctx.data.val, ctx.recipe.validate_.threads
    key = (None if ctx.data.cache_key is None else
           repr((file_digest(ctx.original_onnx_path), ctx.data.cache_key, len(data), threads)))
    predictions, kept = ctx.cache.predicted(key, lambda: ort_predictions(session, data, ctx.progress, "accuracy"))
    if kept:
        ctx.progress.advance("accuracy", len(data))
    return predictions


def run(ctx: RunContext) -> None:
    config = ctx.recipe.validate_
    input_size = tuple(ctx.original.data_config["input_size"])
    data = ctx.data.val
    ctx.progress.stage("validate", f"onnxruntime on {len(data)} images, {config.threads} threads")
    with ctx.clock.part("accuracy"):
        sessions = {"original": open_session(ctx.original_onnx_path, config.threads),
                    "converted": open_session(ctx.onnx_path, config.threads)}
        ctx.progress.start("accuracy", 2 * len(data))
        predictions = {"original": original_predictions(ctx, sessions["original"]),
                       "converted": ort_predictions(sessions["converted"], data, ctx.progress, "accuracy")}
        ctx.progress.finish("accuracy")
    ctx.predictions = predictions
    labels = predictions["original"].labels
    parity = {}
    quantize = ctx.recipe.export.quantize
    parity_begin = time.perf_counter()
    ladder = min(config.ladder_images, len(data))
    if ladder >= min(PARITY_IMAGES, len(data)):  # the ladder's rung of the original: one torch pass for both
        ctx.rungs["original"] = torch_pass(ctx.original.model, data, ladder)
    for name, model in (("original", ctx.original.model), ("converted", ctx.model)):
        if name == "original" and "original" in ctx.rungs:
            reference = ctx.rungs["original"].logits[:PARITY_IMAGES]
        else:
            reference = torch_logits(model, data, PARITY_IMAGES)
        got = predictions[name].head_logits
        parity[name] = {"max_abs_diff": float(np.abs(reference - got).max()),
                        "top1_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
                        "images": len(reference),
                        "onnx": f"int8 {quantize}" if name == "converted" and quantize != "none" else "float32"}
    ctx.clock.add_part("parity (torch)", time.perf_counter() - parity_begin)
    ctx.progress.stage("latency", f"batch sizes {config.batch_sizes}, {config.latency_runs} interleaved runs")
    with ctx.clock.part("latency"):
        timing = latency({"original": ctx.original_onnx_path, "converted": ctx.onnx_path}, config,
                         latency_images(data, max(config.batch_sizes)))
    costs_begin = time.perf_counter()
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
    shares = expert_shares(ctx.model, first_images(data, PARITY_IMAGES, EVAL_BATCH))
    ctx.clock.add_part("params, MACs, expert shares", time.perf_counter() - costs_begin)
    metrics = {name: ModelMetrics.model_validate(row) for name, row in table.items()}
    ctx.report.validation = Validation(
        images=len(data), threads=config.threads, models=metrics, gates=gates(metrics, config),
        expert_shares={"images": min(PARITY_IMAGES, len(data)), **shares} if shares is not None else None)


def gates(models: dict[str, ModelMetrics], config: ValidateConfig) -> list[Gate]:
    """Each configured gate with its measured value and whether it passed."""
    converted, original = models["converted"], models["original"]
    diff = converted.parity.max_abs_diff
    onnx = converted.parity.onnx
    result = [Gate(gate="max_abs_diff", limit=config.max_abs_diff, value=diff, passed=diff <= config.max_abs_diff,
                   note=f"torch float32 vs the {onnx} ONNX model" if onnx != "float32" else None)]
    if config.max_top1_drop is not None and original.top1 is None:
        result.append(Gate(gate="max_top1_drop", limit=config.max_top1_drop, value=None, passed=None,
                           note="skipped: the validation data has no labels"))
    elif config.max_top1_drop is not None:
        drop = original.top1 - converted.top1
        result.append(Gate(gate="max_top1_drop", limit=config.max_top1_drop, value=drop,
                           passed=drop <= config.max_top1_drop))
    if config.min_agreement is not None:
        result.append(Gate(gate="min_agreement", limit=config.min_agreement, value=converted.agreement,
                           passed=converted.agreement >= config.min_agreement))
    return result
