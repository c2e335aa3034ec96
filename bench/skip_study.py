"""The measurements of the attention-skipping issue (PIVOT), through the real pipeline:

1. ``vit_fmnist``: blocks chosen by CKA (``recipes/skip_cka.yaml``, greedy, re-scored) vs the same number
   chosen at random (seeded draws), 2 / 4 / 6 skips, the same fine-tune budget for both; the CKA scores of
   every round come from the CKA runs' reports.
2. ``vit_fmnist``: the cascade of ``recipes/cascade.yaml`` (6 CKA skips, fine-tuned → original): accuracy,
   early-exit share and expected latency per image at low_effort_fraction 0.5 / 0.7 / 0.9.
3. ``deit_s`` (random weights: latency only): onnxruntime latency of 2 / 4 / 6 skips vs the original,
   b1 / b8, all four models interleaved in one run.

Writes ``bench/skip_study.json`` and ``bench/skip_study.md``, then has ``bench/pages.py`` (the tables' one renderer)
rewrite the pages' ``skip_study`` block.

    python bench/skip_study.py --steps 100 --images 10000
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pages

from vitcompress.api import apply_recipe, convert, machine_description
from vitcompress.evaluate import latency
from vitcompress.export import export_onnx
from vitcompress.models import load_model
from vitcompress.recipe import ValidateConfig, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (2, 4, 6)
DEPTH = 12


def skip_runs(args, work: Path) -> list[dict]:
    """CKA-chosen vs random skips on vit_fmnist, same fine-tune budget."""
    common = [f"finetune.steps={args.steps}", f"validate.images={args.images}", "validate.batch_sizes=[1]",
              "validate.latency_runs=5", "validate.max_top1_drop=null"]
    rows = []
    for count in args.counts:
        variants = {"cka": [f"steps.0.count={count}"]}
        for draw in range(args.random_draws):
            chosen = sorted(random.Random(args.seed + 100 * draw + count).sample(range(DEPTH), count))
            variants[f"random #{draw + 1}"] = ["steps.0.select=null", "steps.0.count=null", f"steps.0.blocks={chosen}"]
        for rule, overrides in variants.items():
            print(f"skip study: {count} skips chosen by {rule}", file=sys.stderr, flush=True)
            report = convert("vit_fmnist", ROOT / "recipes" / "skip_cka.yaml", out_dir=work / "run", force=True,
                             overrides=[*common, *overrides]).report
            step = report.steps[0]
            models = report.validation.models
            rows.append({"skips": count, "rule": rule, "blocks": step.modules,
                         "rounds": (step.details or {}).get("rounds"),
                         "top1_original": models["original"].top1, "top1": models["converted"].top1,
                         "agreement": models["converted"].agreement,
                         "finetune": report.finetune and report.finetune.model_dump()})
    return rows


def cascade_run(args, work: Path) -> dict:
    print("skip study: cascade", file=sys.stderr, flush=True)
    report = convert("vit_fmnist", ROOT / "recipes" / "cascade.yaml", out_dir=work / "run", force=True,
                     overrides=[f"finetune.steps={args.steps}", f"validate.images={args.images}",
                                f"validate.latency_runs={args.runs}"]).report
    return {**report.cascade.model_dump(), "low_blocks": report.steps[0].modules,
            "top1_original": report.validation.models["original"].top1}


def deit_latency(args, work: Path) -> dict:
    """ORT latency of deit_s with 2/4/6 skipped attention branches vs the original, interleaved."""
    print("skip study: deit_s latency", file=sys.stderr, flush=True)
    loaded = load_model("deit_s", random_init=True)
    input_size = tuple(loaded.data_config["input_size"])
    paths = {"original": export_onnx(loaded.model, work / "original.onnx", input_size=input_size)}
    for count in args.counts:
        model = copy.deepcopy(loaded.model)
        blocks = [round(i * DEPTH / count) for i in range(count)]
        apply_recipe(model, parse_recipe({"steps": [{"transform": "attention_skip", "blocks": blocks}]}, "study"))
        paths[f"{count} skips"] = export_onnx(model, work / f"skip{count}.onnx", input_size=input_size)
    timing = latency(paths, ValidateConfig(batch_sizes=[1, 8], latency_runs=args.runs))
    return {name: {f"b{batch}": {**ms, "ratio": timing["original"][batch]["p50_ms"] / ms["p50_ms"]}
                   for batch, ms in per_batch.items()} for name, per_batch in timing.items()}


markdown = pages.skip_study_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="fine-tune steps of every variant")
    parser.add_argument("--images", type=int, default=10000, help="test images for accuracy")
    parser.add_argument("--runs", type=int, default=20, help="interleaved latency runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random block choices")
    parser.add_argument("--random-draws", type=int, default=2, help="random block choices per skip count")
    parser.add_argument("--parts", nargs="*", default=["skip", "cascade", "deit_s"],
                        help="parts to (re)measure; none: only rebuild the tables from skip_study.json")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="numbers of skipped blocks")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    path = args.out / "skip_study.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    commit = pages.source_commit(ROOT)  # before this run rewrites its results file
    work = Path(tempfile.mkdtemp(prefix="skip-study-"))
    try:
        parts = {"skip": skip_runs, "cascade": cascade_run, "deit_s": deit_latency}
        for part in args.parts:
            results[part] = parts[part](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update(date=datetime.date.today().isoformat(), machine=machine_description(), commit=commit,
                   settings={"steps": args.steps, "images": args.images, "runs": args.runs, "seed": args.seed,
                             "random_draws": args.random_draws})
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if {"skip", "cascade", "deit_s"} <= set(results):
        (args.out / "skip_study.md").write_text(markdown(results))
        if args.out.resolve() == (ROOT / "bench").resolve():
            pages.write(ROOT)
        print(markdown(results))


if __name__ == "__main__":
    main()
