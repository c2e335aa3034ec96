"""How far a bundle's golden logits move when onnxruntime runs the same model differently on one CPU.

``vitcompress verify`` compares a bundle's models with the logits the converting machine wrote
(``golden/``). Another CPU runs other kernels (AVX2, AVX-512, VNNI, AMX code paths), and int8 kernels differ
more than float32 ones (u8×s8 products saturate in 16 bits on AVX2, not with VNNI). Only one CPU kind was
available for this study, so it measures a proxy: the golden configuration (intra-op threads as the bundle's,
``ORT_ENABLE_ALL``) against every other combination of intra-op threads (1, 2) and graph optimisation level
(``ORT_DISABLE_ALL``, ``ORT_ENABLE_BASIC``, ``ORT_ENABLE_ALL``), which change the fused kernels and the
reduction orders on the same instruction set. It is not a cross-CPU figure.

The models: the shipped ``vit_fmnist`` (real weights) exported in float32, and its int8 forms by the package's
own :func:`vitcompress.quantize.quantize_onnx` (dynamic; static with 64 calibration images). Inputs: the first
256 Fashion-MNIST test images. Writes ``bench/golden_tolerance.json`` (rendered into docs/deploy.md by
bench/pages.py).

    python bench/golden_tolerance.py
"""

from __future__ import annotations

import datetime
import gzip
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitcompress.data import fmnist_dir
from vitcompress.deploy.cpus import available_cpus, isa_flags
from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, session_options
from vitcompress.export import export_onnx
from vitcompress.models import REFERENCE_CFG, load_model
from vitcompress.quantize import quantize_onnx

OUT = Path(__file__).parent / "golden_tolerance.json"
LEVELS = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
GOLDEN = (2, "all")  # the bundle writer's session: validate.threads (default 2), ORT_ENABLE_ALL


def fmnist_images(count: int, offset: int = 0) -> np.ndarray:
    """Fashion-MNIST test images ``offset …`` as the model takes them (normalised, N×1×28×28 float32)."""
    with gzip.open(fmnist_dir() / "t10k-images-idx3-ubyte.gz") as file:
        raw = np.frombuffer(file.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    images = raw[offset:offset + count].astype(np.float32) / 255
    return (images - REFERENCE_CFG["mean"][0]) / REFERENCE_CFG["std"][0]


def logits(path: Path, inputs: np.ndarray, threads: int, level: str) -> np.ndarray:
    options = session_options(threads)
    options.graph_optimization_level = LEVELS[level]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([LOGITS], {INPUT_NAME: inputs[i:i + 8]})[0] for i in range(0, len(inputs), 8)])


def main() -> None:
    from pages import source_commit

    commit = source_commit()  # before this run rewrites its results file
    inputs = fmnist_images(256)
    work = Path(tempfile.mkdtemp(prefix="golden-tolerance-"))
    model = load_model("vit_fmnist").model
    fp32 = export_onnx(model, work / "fp32.onnx", input_size=REFERENCE_CFG["input_size"])
    paths = {"fp32": fp32,
             "int8 dynamic": work / "dynamic.onnx", "int8 static": work / "static.onnx"}
    quantize_onnx(fp32, paths["int8 dynamic"], "dynamic")
    quantize_onnx(fp32, paths["int8 static"], "static", calibration=[fmnist_images(64, offset=5000)])
    rows = []
    for precision, path in paths.items():
        golden = logits(path, inputs, *GOLDEN)
        for threads, level in itertools.product((1, 2), LEVELS):
            if (threads, level) == GOLDEN:
                continue
            got = logits(path, inputs, threads, level)
            rows.append({"model": precision, "threads": threads, "graph_optimization": level,
                         "max_abs_diff": float(np.abs(got - golden).max()),
                         "top1_equal": int((got.argmax(-1) == golden.argmax(-1)).sum()),
                         "images": len(inputs), "max_abs_logit": float(np.abs(golden).max())})
            print(rows[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    OUT.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "cpu": cpu, "isa": isa_flags(), "cpus_available": available_cpus(),
        "commit": commit, "images": len(inputs),
        "onnxruntime": ort.__version__, "golden": {"threads": GOLDEN[0], "graph_optimization": GOLDEN[1]},
        "note": "one CPU kind: the spread between onnxruntime configurations on it, not between CPUs",
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
