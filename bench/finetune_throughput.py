"""Fine-tune throughput of the reference model (vit_fmnist) through `vitcompress convert`: 1 process fp32,
1 process bf16 (autocast), 2 processes × 1 thread (DDP over gloo, `--nproc 2`). Writes one JSON line per
configuration to bench/finetune_throughput.jsonl with the date, the CPU, the threads and the load.

    python bench/finetune_throughput.py [--steps 40] [--batch 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """model: vit_fmnist
steps: []
finetune: {{steps: {steps}, batch_size: {batch}, warmup_steps: 2, workers: 0, precision: {precision}}}
validate: {{images: 16, batch_sizes: [1], latency_runs: 3, warmup_runs: 1, profile_runs: 0}}
"""
CONFIGS = [("1 process fp32", 1, "fp32"), ("1 process bf16", 1, "bf16"), ("2 processes x 1 thread fp32", 2, "fp32")]


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def measure(name: str, nproc: int, precision: str, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(RECIPE.format(steps=steps, batch=batch, precision=precision))
        load_before = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "vitcompress", "convert", "--recipe", str(recipe), "--out",
                        f"{tmp}/out", "--nproc", str(nproc), "--json"], check=True, cwd=ROOT, capture_output=True)
        finetune = json.loads((Path(tmp) / "out" / "report.json").read_text())["finetune"]
    return {"config": name, "images_per_second": round(finetune["images_per_second"], 1),
            "world_size": finetune["world_size"], "per_rank_batch": finetune["per_rank_batch"],
            "precision": finetune["precision"], "steps": steps, "global_batch": batch,
            "threads_per_process": max(1, (os.cpu_count() or 1) // nproc),
            "date": datetime.date.today().isoformat(), "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    out = ROOT / "bench" / "finetune_throughput.jsonl"
    from pages import source_commit
    commit = source_commit()  # before this run appends to its results file
    with out.open("a") as file:
        for name, nproc, precision in CONFIGS:
            row = {**measure(name, nproc, precision, args.steps, args.batch), "commit": commit}
            print(json.dumps(row), flush=True)
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
