"""One tune trial measured: a real conversion of a recipe, and what the search reads from its report.

A trial is :func:`vitcompress.api.convert` on the study's model and data with the trial's recipe (into a
temporary directory, deleted afterwards): apply → optional fine-tune → ONNX export → onnxruntime latency of the
converted model interleaved with the original's (spinning off, under the machine-wide latency lock, as every
conversion times) → top-1 and agreement on the held-out validation images. The original's export is shared by
the worker's trials through one :class:`~vitcompress.original_cache.OriginalCache`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from vitcompress.api import convert
from vitcompress.original_cache import OriginalCache
from vitcompress.recipe import Recipe


class Measured(BaseModel):
    """What a trial's conversion measured (stored with the trial as its ``result`` user attribute)."""

    model_config = ConfigDict(extra="forbid")

    speedup: float = Field(description="original p50 / converted p50 at the study's batch size, timed interleaved")
    latency_ms: float
    original_ms: float
    spread: float = Field(description="(p90 − p10) / p50 of the converted model's runs")
    top1: Optional[float] = Field(description="onnxruntime top-1 (%) on the held-out images; None: unlabelled")
    original_top1: Optional[float]
    agreement: float = Field(description="share of held-out images whose top-1 class equals the original's")
    drop: float = Field(description="top-1 drop in points (original − converted); unlabelled data: "
                                    "disagreement in points, 100 × (1 − agreement)")
    max_abs_diff: float = Field(description="largest |torch − onnxruntime| logit difference (the parity gate's value)")
    finetune_steps: int = Field(0, description="fine-tune steps of this measurement (its fidelity)")
    seconds: float = Field(description="wall time of the conversion")


def drop_of(top1: float | None, original_top1: float | None, agreement: float) -> float:
    """Points lost: top-1 when the data is labelled, else disagreement with the original."""
    if top1 is None or original_top1 is None:
        return 100.0 * (1.0 - agreement)
    return original_top1 - top1


def measure(model: str, recipe: Recipe, batch_size: int, cache: OriginalCache, **source: Any) -> Measured:
    """Convert ``model`` with ``recipe`` and read the trial's numbers from the report.

    ``source`` is :func:`convert`'s ``data``, ``checkpoint``, ``random_init`` and ``model_args``. A recipe the
    model's transforms refuse raises the conversion's :class:`~vitcompress.errors.VitCompressError`."""
    started = time.perf_counter()
    result = convert(model, recipe, cache=cache, **source)
    try:
        report = result.report
        converted = report.validation.models["converted"]
        original = report.validation.models["original"]
        mine, theirs = converted.latency[batch_size], original.latency[batch_size]
        return Measured(
            speedup=theirs.p50_ms / mine.p50_ms, latency_ms=mine.p50_ms, original_ms=theirs.p50_ms,
            spread=mine.spread, top1=converted.top1, original_top1=original.top1, agreement=converted.agreement,
            drop=drop_of(converted.top1, original.top1, converted.agreement),
            max_abs_diff=converted.parity.max_abs_diff,
            finetune_steps=report.finetune.steps_done if report.finetune else 0,
            seconds=time.perf_counter() - started)
    finally:
        shutil.rmtree(Path(result.out_dir), ignore_errors=True)
