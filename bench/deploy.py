"""Deployment numbers of README's "Deploy" section, measured on the reference model's bundle.

    python bench/deploy.py [--out runs/deploy_bench] [--images 256] [--threads 2]

Converts ``vit_fmnist`` with ``recipes/svd.yaml`` (fine-tune skipped: the bundle's files and sizes are the
same with it), adds ``model.opt.onnx`` (basic) and ``model.ort``, then measures: the bundle's size, the time
of ``vitcompress verify`` (a fresh process, as a user runs it, and the checks alone), ``vitcompress predict``'s
images/s (decode + preprocess + onnxruntime) at batch 1 and 32 on Fashion-MNIST test images saved as PNG, and
the start-up time (session creation + first run) of model.onnx, model.opt.onnx and model.ort, interleaved.
Writes bench/deploy.json (its table in docs/deploy.md is rendered by bench/pages.py) and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def convert(out: Path) -> None:
    import vitcompress

    vitcompress.convert("vit_fmnist", ROOT / "recipes/svd.yaml", out_dir=out, force=True,
                        overrides=["finetune=null", "validate.images=512", "validate.profile_runs=0",
                                   "validate.batch_sizes=[1,32]"])
    from vitcompress.deploy.optimize import optimize_offline

    optimize_offline(out, "basic", ort_format=True)


def png_images(directory: Path, count: int) -> list[Path]:
    from vitcompress.data import load_fmnist_arrays

    images, _ = load_fmnist_arrays("test")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(directory / f"{i:05d}.png")
        Image.fromarray(images[i, 0].numpy()).save(paths[-1])
    return paths


def cli_seconds(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitcompress", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/deploy_bench")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from pages import source_commit

    from vitcompress.deploy.bundle import verify
    from vitcompress.deploy.predict import BundlePredictor
    from vitcompress.deploy.runtime import INPUT_NAME, open_session
    commit = source_commit()  # before this run rewrites its results file
    bundle = args.out / "bundle"
    convert(bundle)
    sizes = {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    paths = png_images(args.out / "images", args.images)
    verify_cli = [cli_seconds("verify", str(bundle)) for _ in range(3)]
    verify_checks = [verify(bundle, threads=args.threads).seconds for _ in range(3)]
    predictor = BundlePredictor(bundle, threads=args.threads)
    rates: dict[str, list[float]] = {"b1": [], "b32": []}
    predictor.predict(paths[:32], batch_size=32)  # warm-up
    for _ in range(5):  # interleaved, so load from other processes hits both batch sizes alike
        for batch in (1, 32):
            start = time.perf_counter()
            predictor.predict(paths, batch_size=batch, top_k=5)
            rates[f"b{batch}"].append(len(paths) / (time.perf_counter() - start))
    throughput = {batch: statistics.median(values) for batch, values in rates.items()}
    one = np.zeros((1, 1, 28, 28), np.float32)
    startup: dict[str, list[float]] = {name: [] for name in ("model.onnx", "model.opt.onnx", "model.ort")}
    for _ in range(7):
        for name in startup:
            start = time.perf_counter()
            open_session(bundle / name, args.threads).run(None, {INPUT_NAME: one})
            startup[name].append((time.perf_counter() - start) * 1e3)
    result = {
        "date": datetime.date.today().isoformat(), "cpu": cpu(), "threads": args.threads, "commit": commit,
        "load_average_1min": os.getloadavg()[0],
        "model": "vit_fmnist + recipes/svd.yaml (finetune skipped)", "images": args.images,
        "bundle_bytes": sum(sizes.values()), "files": sizes,
        "verify_cli_s": statistics.median(verify_cli), "verify_checks_s": statistics.median(verify_checks),
        "predict_images_per_s": throughput,
        "startup_ms": {name: statistics.median(ms) for name, ms in startup.items()},
    }
    (ROOT / "bench/deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    mb = 1 / 1e6
    print(f"Measured {result['date']} on {result['cpu']}, onnxruntime {args.threads} intra-op threads, load "
          f"average {result['load_average_1min']:.1f} at the end.\n")
    print("| what | value |\n|---|---|")
    print(f"| bundle size | {result['bundle_bytes'] * mb:.1f} MB (model.onnx {sizes['model.onnx'] * mb:.1f}, "
          f"model.safetensors {sizes['model.safetensors'] * mb:.1f}, "
          f"model.opt.onnx {sizes['model.opt.onnx'] * mb:.1f}, "
          f"model.ort {sizes['model.ort'] * mb:.1f}, golden/ "
          f"{sum(v for k, v in sizes.items() if k.startswith('golden/')) * mb:.2f}) |")
    print(f"| `vitcompress verify` | {result['verify_cli_s']:.2f} s as a command, {result['verify_checks_s']:.2f} s "
          "of checks |")
    for batch, rate in throughput.items():
        print(f"| `predict` {batch} | {rate:.0f} images/s ({args.images} PNGs: decode, preprocess, onnxruntime) |")
    for name, ms in result["startup_ms"].items():
        print(f"| start-up {name} | {ms:.1f} ms (session + first run, median of 7) |")
    shutil.rmtree(args.out / "images", ignore_errors=True)


if __name__ == "__main__":
    main()
