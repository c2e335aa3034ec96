"""int8 export study (``export.quantize``): what static and dynamic int8 buy on DeiT-S, alone and after the fast
recipe, and which calibration method keeps vit_fmnist's accuracy.

- ``latency``: DeiT-S (random init: latency does not depend on the weights) as exported, ORT dynamic int8 of it
  (:func:`ort_int8.quantized`, the bench's baseline), static int8 of it, and the fast recipe's model (its
  steps applied, no fine-tune) in float32, dynamic and static int8 (uint8 and int8 activations; and with the
  layers' outputs quantised too, onnxruntime's default, against the float outputs ``static`` ships), all timed
  interleaved in one process with :func:`vitcompress.deploy.runtime.measure_latency`; ratios are float32 p50 / p50.
- ``calibration``: vit_fmnist after the fast recipe's steps (no fine-tune) in float32 and static int8 by each
  calibration method (512 training images): top-1 and agreement with float32 on Fashion-MNIST test images.

Writes bench/quant_study.json. ``python bench/quant_study.py [--parts latency calibration]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from ort_int8 import quantized

from vitcompress.api import apply, machine_description
from vitcompress.data import first_images, fmnist_dataset
from vitcompress.deploy.runtime import measure_latency, open_session
from vitcompress.evaluate import ort_predictions, top1
from vitcompress.export import export_onnx
from vitcompress.models import load_model
from vitcompress.quantize import quantize_onnx

RECIPE = Path(__file__).parent.parent / "recipes" / "fast.yaml"
OUT = Path(__file__).with_suffix(".json")
THREADS, RUNS, WARMUP, BATCHES = 2, 20, 3, [1, 8]


def gaussian(count: int, shape: tuple[int, ...], batch: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, *shape), dtype=np.float32) for _ in range(count // batch)]


def latency_study(work: Path) -> dict:
    """Interleaved ORT latency of the eight DeiT-S models; calibration on Gaussian noise (ranges do not change
    the work, only the values)."""
    import torch

    torch.manual_seed(0)
    shape = (3, 224, 224)
    original = load_model("deit_s", random_init=True).model
    fp32 = export_onnx(original, work / "deit_s.onnx", input_size=shape)
    fast = apply(load_model("deit_s", random_init=True).model, RECIPE,
                 calibration=torch.from_numpy(np.concatenate(gaussian(64, shape))))
    fast_fp32 = export_onnx(fast, work / "fast.onnx", input_size=shape)
    paths = {"fp32": fp32, "ORT dynamic": quantized(fp32, work / "deit_s_dyn.onnx")}
    paths["static"] = work / "deit_s_static.onnx"
    quantize_onnx(fp32, paths["static"], "static", calibration=gaussian(32, shape))
    paths["fast fp32"] = fast_fp32
    paths["fast + dynamic"] = work / "fast_dyn.onnx"
    quantize_onnx(fast_fp32, paths["fast + dynamic"], "dynamic")
    for activations in ("uint8", "int8"):
        name = "fast + static" + ("" if activations == "uint8" else " (int8 activations)")
        paths[name] = work / f"fast_static_{activations}.onnx"
        quantize_onnx(fast_fp32, paths[name], "static", calibration=gaussian(32, shape), activations=activations)
    paths["fast + static (layer outputs quantised)"] = work / "fast_static_outputs.onnx"
    quantize_onnx(fast_fp32, paths["fast + static (layer outputs quantised)"], "static",
                  calibration=gaussian(32, shape), quantised_outputs=True)
    timing = measure_latency(paths, batch_sizes=BATCHES, threads=THREADS, runs=RUNS, warmup=WARMUP)
    return {name: {f"b{batch}": {"p50_ms": t["p50_ms"], "p90_ms": t["p90_ms"],
                           "speedup_vs_fp32": timing["fp32"][batch]["p50_ms"] / t["p50_ms"]}
                   for batch, t in timing[name].items()} for name in paths}


def calibration_study(work: Path, images: int = 2000) -> dict:
    """Top-1 and agreement with float32 of static int8 by each calibration method, on vit_fmnist + fast steps."""
    train, test = fmnist_dataset("train", 512), fmnist_dataset("test", images)
    model = apply(load_model("vit_fmnist").model, RECIPE, calibration=train)
    fp32 = export_onnx(model, work / "fmnist_fast.onnx", input_size=(1, 28, 28))
    reference = ort_predictions(open_session(fp32, THREADS), test)
    result = {"float32": {"top1": top1(reference.classes, reference.labels), "agreement": 1.0}}
    for method in ("minmax", "entropy", "percentile"):
        path = work / f"fmnist_{method}.onnx"
        start = time.perf_counter()
        quantize_onnx(fp32, path, "static", method=method,
                      calibration=(b.numpy() for b in first_images(train, 512, 128)))
        seconds = time.perf_counter() - start
        got = ort_predictions(open_session(path, THREADS), test)
        result[method] = {"top1": top1(got.classes, got.labels), "calibration_s": seconds,
                          "agreement": float((got.classes == reference.classes).mean())}
    return {"model": "vit_fmnist + fast steps (no fine-tune)", "calibration_images": 512, "test_images": images,
            "methods": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["latency", "calibration"], default=["latency", "calibration"])
    args = parser.parse_args()
    from pages import source_commit
    commit = source_commit()  # before this run rewrites its results file
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        for part in args.parts:
            study = latency_study if part == "latency" else calibration_study
            result[part] = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                            "platform": platform.platform(), "commit": commit,
                            "threads": THREADS, "runs": RUNS, "warmup": WARMUP,
                            **study(Path(scratch))}
            OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
