"""Conversion wall time (issue 36 item 6): ``vitcompress convert deit_s --recipe svd --set finetune=null`` with every
other default (random init, synthetic data: no downloads), once, in a fresh process, through the API; where the time
went is the report's own ``timings`` (seconds per stage and part) and each step's calibration seconds. Writes
bench/convert_walltime.json: date, CPU, threads, the machine's load (``uptime`` before and after: the machine may be
shared), the wall seconds and the breakdown. The target is 60 s on a 2-core CPU.

    python bench/convert_walltime.py [--out bench/convert_walltime.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitcompress
from vitcompress.measure import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pages import source_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60.0


def uptime() -> str:
    """``uptime``'s line (the load averages), or the load averages alone where there is no ``uptime``."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "convert_walltime.json")
    args = parser.parse_args()
    commit = source_commit()  # before this run rewrites its results file
    overrides = ["finetune=null"]
    recipe = vitcompress.load_recipe("svd", overrides)
    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = vitcompress.convert("deit_s", "svd", random_init=True, data="synthetic", overrides=overrides,
                                     out_dir=Path(tmp) / "deit_s-svd")
        wall = time.perf_counter() - start
    report = result.report
    validate = recipe.validate_
    record = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "onnxruntime_threads": report.validation.threads,
        "commit": commit, "uptime_before": before, "uptime_after": uptime(),
        "conversion": "vitcompress convert deit_s --recipe svd --set finetune=null --random-init --data synthetic",
        "calibration_images": min(recipe.calibration.images, report.data.train_images),
        "validation_images": report.validation.images, "latency_runs": validate.latency_runs,
        "profile_runs": validate.profile_runs, "ladder_images": report.explain.ladder.images if report.explain.ladder
        else 0, "wall_s": wall, "target_s": TARGET_S, "stages_s": report.timings.seconds,
        "stages": [stage.model_dump() for stage in report.timings.stages],
        "steps": [{"step": step.step, "transform": step.transform, "modules": len(step.modules),
                   "seconds": step.seconds, "calibration_seconds": step.calibration_seconds}
                  for step in report.steps]}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
