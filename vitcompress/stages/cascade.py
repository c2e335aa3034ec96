"""Stage 5b — cascade (only with a recipe ``cascade:`` section): PIVOT's low/high-effort inference.

The converted model (the recipe's ``cascade.low`` steps, fine-tuned) is the low-effort model; the
high-effort model is the original or the original with ``cascade.high`` applied and fine-tuned with the
same budget. Both are exported with an extra ``entropy`` output (``low.onnx``, ``high.onnx``); the entropy
threshold is calibrated on the validation images so that ``low_effort_fraction`` of them exit early and
written to ``cascade.json``. The report gets the cascade's top-1 (run through :class:`Cascade`, the
deployment runner), the fraction that exited early and the expected latency per image
``c_low + (1 − f)·c_high`` from onnxruntime latencies measured interleaved with the original's, plus the
same numbers at other fractions (``sweep``) from the same model outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
from torch.utils.data import DataLoader

from vitcompress.context import RunContext
from vitcompress.deploy.runtime import CASCADE_FILE, ENTROPY, LOGITS, Cascade, calibrate_threshold, open_session
from vitcompress.evaluate import EVAL_BATCH, latency, ort_predictions, top1
from vitcompress.export import export_onnx
from vitcompress.layers.entropy import WithEntropy
from vitcompress.pipeline import apply_steps, finetune, run_metadata
from vitcompress.report import Cascade as CascadeSection
from vitcompress.report import CascadeHigh, Sections

SWEEP_FRACTIONS = (0.5, 0.7, 0.9)


def high_effort_model(ctx: RunContext):
    """The high-effort model and what was done to it (steps, fine-tune), or the original itself."""
    config = ctx.recipe.cascade
    if config.high == "original":
        return ctx.original.model, CascadeHigh(steps="original", finetune=None)
    model = copy.deepcopy(ctx.original.model)
    steps = apply_steps(ctx, model, config.high)
    sub = dataclasses.replace(ctx, model=model, report=Sections())
    return model, CascadeHigh(steps=steps, finetune=finetune(sub))


def outputs(path, dataset, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 classes, entropies and labels of every image of ``dataset`` through one cascade ONNX file."""
    predicted = ort_predictions(open_session(path, threads), dataset, keep_logits=0, entropy=True)
    return predicted.classes, predicted.entropy, predicted.labels


def operating_point(fraction: float, low: tuple, high_classes: np.ndarray, timing: dict) -> dict:
    """Threshold, early-exit share, top-1 and expected latency per image of the cascade at ``fraction``."""
    low_classes, entropy, labels = low
    threshold = calibrate_threshold(entropy, fraction)
    early = entropy.astype(np.float64) <= threshold
    point = {"low_effort_fraction": fraction, "threshold": threshold, "early_fraction": float(early.mean()),
             "top1": top1(np.where(early, low_classes, high_classes), labels), "expected_ms": {}}
    for batch in timing["low"]:
        cost = timing["low"][batch]["p50_ms"] + (1 - early.mean()) * timing["high"][batch]["p50_ms"]
        point["expected_ms"][batch] = {"cascade": float(cost), "original": timing["original"][batch]["p50_ms"],
                                       "speedup": timing["original"][batch]["p50_ms"] / float(cost)}
    return point


def run(ctx: RunContext) -> None:
    config = ctx.recipe.cascade
    if config is None:
        return
    validate = ctx.recipe.validate_
    input_size = tuple(ctx.original.data_config["input_size"])
    high, high_info = high_effort_model(ctx)
    ctx.progress.stage("cascade", f"low/high-effort models, {config.low_effort_fraction:g} exit early")
    metadata = run_metadata(ctx)
    paths = {"low": ctx.work_dir / "low.onnx", "high": ctx.work_dir / "high.onnx"}
    for name, model in (("low", ctx.model), ("high", high)):
        export_onnx(WithEntropy(model), paths[name], input_size=input_size, config=ctx.recipe.export,
                    metadata=metadata, output_names=(LOGITS, ENTROPY))
    data = ctx.data.val
    low = outputs(paths["low"], data, validate.threads)
    high_classes, _, labels = outputs(paths["high"], data, validate.threads)
    threshold = calibrate_threshold(low[1], config.low_effort_fraction)
    spec = {"low": "low.onnx", "high": "high.onnx", "threshold": threshold,
            "low_effort_fraction": config.low_effort_fraction,
            "entropy": "Shannon entropy (nats) of the low model's softmax; exit early when entropy <= threshold",
            "calibration": {"data": ctx.data.name, "images": len(data)}}
    (ctx.work_dir / CASCADE_FILE).write_text(json.dumps(spec, indent=2))
    runner = Cascade(ctx.work_dir, validate.threads)
    early_parts, class_parts = [], []
    for images, _ in DataLoader(data, batch_size=EVAL_BATCH):
        result = runner.predict(images.numpy())
        early_parts.append(result.early)
        class_parts.append(result.logits.argmax(-1))
    early, classes = np.concatenate(early_parts), np.concatenate(class_parts)
    ctx.progress.stage("latency", "original, low and high effort, interleaved")
    timing = latency({"original": ctx.original_onnx_path, **paths}, validate)
    fractions = sorted({*SWEEP_FRACTIONS, config.low_effort_fraction})
    point = operating_point(config.low_effort_fraction, low, high_classes, timing)
    ctx.report.cascade = CascadeSection.model_validate({
        "low_effort_fraction": config.low_effort_fraction, "threshold": threshold,
        "early_fraction": float(early.mean()), "images": len(data),
        "top1": top1(classes, labels), "top1_low": top1(low[0], labels), "top1_high": top1(high_classes, labels),
        "expected_ms": point["expected_ms"], "latency": timing, "high": high_info,
        "sweep": [operating_point(f, low, high_classes, timing) for f in fractions],
    })
