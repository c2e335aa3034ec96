"""The measurements of the attention-skipping issue (PIVOT), through the real pipeline:

1. ``vit_fmnist``: blocks chosen by CKA (``recipes/skip_cka.yaml``, greedy, re-scored) vs the same number
   chosen at random (seeded draws), 2 / 4 / 6 skips, the same fine-tune budget for both; the CKA scores of
   every round come from the CKA runs' reports.
2. ``vit_fmnist``: the cascade of ``recipes/cascade.yaml`` (6 CKA skips, fine-tuned → original): accuracy,
   early-exit share and expected latency per image at low_effort_fraction 0.5 / 0.7 / 0.9.
3. ``deit_s`` (random weights: latency only): onnxruntime latency of 2 / 4 / 6 skips vs the original,
   b1 / b8, all four models interleaved in one run.

Writes ``bench/skip_study.json`` and ``bench/skip_study.md``, and copies the tables into README.md between the
``skip_study:start`` / ``skip_study:end`` markers.

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

from readme_block import replace_readme_block

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


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Measured {results['date']} on {results['machine']} (CPU shared with other work); onnxruntime CPU, "
             f"2 intra-op threads. Accuracy on the first {s['images']} Fashion-MNIST test images; fine-tune "
             f"{s['steps']} steps, batch 64, for every variant.", "",
             "**CKA vs random choice of skipped blocks (vit_fmnist, same fine-tune budget)**", "",
             "| skips | rule | blocks | top-1 (orig → skipped) | agreement |", "|---|---|---|---|---|"]
    for r in results["skip"]:
        blocks = ", ".join(b.split(".")[1] for b in r["blocks"])
        lines.append(f"| {r['skips']} | {r['rule']} | {blocks} | {r['top1_original']:.2f} → {r['top1']:.2f} "
                     f"| {r['agreement'] * 100:.2f} % |")
    first = next(r["rounds"][0]["cka"] for r in results["skip"] if r["rounds"])
    lines += ["", "First-round CKA(block input, attention output) per block: "
              + ", ".join(f"{b.split('.')[1]}: {v:.3f}" for b, v in first.items()), ""]
    c = results["cascade"]
    lines += [f"**Cascade (vit_fmnist): low = {len(c['low_blocks'])} CKA skips (top-1 {c['top1_low']:.2f}), "
              f"high = original (top-1 {c['top1_high']:.2f})**; threshold calibrated on the same images; expected "
              "latency per image = c_low + (1 − f)·c_high at batch 1 and 8, components measured interleaved.", "",
              "| low_effort_fraction | exit early | cascade top-1 | b1 ms (orig → cascade) | b1 speed-up "
              "| b8 ms/batch (orig → cascade) | b8 speed-up |", "|---|---|---|---|---|---|---|"]
    for p in c["sweep"]:
        b1, b8 = p["expected_ms"]["b1"], p["expected_ms"]["b8"]
        lines.append(f"| {p['low_effort_fraction']:g} | {p['early_fraction'] * 100:.1f} % | {p['top1']:.2f} "
                     f"| {b1['original']:.2f} → {b1['cascade']:.2f} | {b1['speedup']:.2f}× "
                     f"| {b8['original']:.1f} → {b8['cascade']:.1f} | {b8['speedup']:.2f}× |")
    lines += ["", "**deit_s (random weights) onnxruntime latency with skipped attention branches**", "",
              "| model | b1 p50 ms | b1 speed-up | b8 p50 ms | b8 speed-up |", "|---|---|---|---|---|"]
    for name, t in results["deit_s"].items():
        lines.append(f"| {name} | {t['b1']['p50_ms']:.2f} | {t['b1']['ratio']:.2f}× | {t['b8']['p50_ms']:.1f} "
                     f"| {t['b8']['ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


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
    work = Path(tempfile.mkdtemp(prefix="skip-study-"))
    try:
        parts = {"skip": skip_runs, "cascade": cascade_run, "deit_s": deit_latency}
        for part in args.parts:
            results[part] = parts[part](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update(date=datetime.date.today().isoformat(), machine=machine_description(),
                   settings={"steps": args.steps, "images": args.images, "runs": args.runs, "seed": args.seed,
                             "random_draws": args.random_draws})
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if {"skip", "cascade", "deit_s"} <= set(results):
        (args.out / "skip_study.md").write_text(markdown(results))
        if args.out.resolve() == (ROOT / "bench").resolve():
            replace_readme_block("skip_study", markdown(results))
        print(markdown(results))


if __name__ == "__main__":
    main()
