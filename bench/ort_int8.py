"""ORT dynamic int8 quantisation: the baseline a user would reach for instead of vitcompress, and what they
can stack on top of a recipe.

``quantize_dynamic`` (onnxruntime.quantization, int8 weights, uint8 activations quantised per tensor at run
time) is applied to the original model's ONNX and to a recipe's exported ``model.onnx`` (layers that already
are int8, like the shift recipes' MatMulInteger, are left as they are). The four models are then timed
interleaved in one process, so "recipe vs ORT int8" is a same-run ratio, and the int8 models' top-1 is
measured in onnxruntime on the same validation images as the pipeline's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from vitcompress.data import resolve_data
from vitcompress.deploy.runtime import open_session
from vitcompress.evaluate import latency, latency_images, ort_predictions, top1
from vitcompress.export import export_onnx
from vitcompress.models import default_data, load_model, model_classes
from vitcompress.recipe import ValidateConfig

MODELS = ("original", "original + ORT int8", "converted", "converted + ORT int8")


def quantized(path: Path, out: Path) -> Path:
    """``path`` with every float MatMul/Conv weight int8 and its activations dynamically quantised."""
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


class Originals:
    """Each model's original exported and int8-quantised once per bench process, with its validation data and
    the predictions of both (every recipe is compared with the same two models, so they run once)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.cache: dict[str, tuple[Path, Path, object]] = {}
        self.predicted: dict[tuple[Path, int], object] = {}

    def predictions(self, path: Path, data, threads: int):
        """onnxruntime's predictions of one of the originals on its validation data, computed once."""
        if (path, threads) not in self.predicted:
            self.predicted[path, threads] = ort_predictions(open_session(path, threads), data)
        return self.predicted[path, threads]

    def get(self, name: str, random_init: bool):
        if name not in self.cache:
            loaded = load_model(name, random_init=random_init)
            fp32 = export_onnx(loaded.model, self.work / f"{name}.onnx",
                               input_size=tuple(loaded.data_config["input_size"]))
            data = resolve_data(default_data(loaded.name, random_init), loaded.data_config, None,
                                model_classes(loaded)).val
            self.cache[name] = (fp32, quantized(fp32, self.work / f"{name}_int8.onnx"), data)
        return self.cache[name]


def measure(originals: Originals, name: str, random_init: bool, bundle: Path, runs: int, threads: int) -> dict:
    """Interleaved ORT latency (b1, b8) of the four models and the int8 models' top-1 (None without labels)."""
    original, original_int8, data = originals.get(name, random_init)
    paths = dict(zip(MODELS, (original, original_int8, bundle / "model.onnx",
                              quantized(bundle / "model.onnx", originals.work / "converted_int8.onnx"))))
    config = ValidateConfig(batch_sizes=[1, 8], threads=threads, latency_runs=runs)
    timing = latency(paths, config, latency_images(data, 8))
    accuracy = {}
    for model in ("original + ORT int8", "converted + ORT int8"):
        predicted = (originals.predictions(original_int8, data, threads) if model == "original + ORT int8"
                     else ort_predictions(open_session(paths[model], threads), data))
        accuracy[model] = {"top1": top1(predicted.classes, predicted.labels), "predictions": predicted.classes}
    reference = originals.predictions(original, data, threads).classes
    agreement = {m: float(np.mean(a["predictions"] == reference)) for m, a in accuracy.items()}
    return {"latency": {model: {f"b{batch}": t for batch, t in per_batch.items()} for model, per_batch in timing.items()},
            "top1": {m: a["top1"] for m, a in accuracy.items()}, "agreement": agreement, "runs": runs}
