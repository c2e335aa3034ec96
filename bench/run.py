"""The benchmark behind every number in README.md (design.md §7).

For each model (the embedded ``vit_fmnist`` with its Fashion-MNIST test split; ``deit_s`` at 224 with random
weights, latency only) and each shipped recipe, runs the real ``vitcompress convert`` pipeline through the
Python API, once as the recipe says and once without its fine-tune, and collects what the reports measured:
params, MACs, MAC-ideal speed-up, onnxruntime latency at b1/b8 interleaved with the original in the same
process, measured speed-up, top-1 and agreement. Writes ``bench/results.json`` and ``bench/results.md``.

    python bench/run.py                      # everything (about 25 minutes on 2 cores)
    python bench/run.py --models vit_fmnist --recipes svd
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from vitcompress.api import convert, machine_description

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "vit_fmnist": {"args": {}, "overrides": []},
    "deit_s": {"args": {"random_init": True, "data": "synthetic"},
               "overrides": ["finetune=null", "validate.max_top1_drop=null", "validate.min_agreement=null"]},
}


def variants(model: str, recipe: Path) -> list[tuple[str, list[str]]]:
    """(label, overrides) for each run of a recipe on a model: as shipped, and without fine-tune."""
    base = MODELS[model]["overrides"]
    if model == "deit_s":
        return [(recipe.stem, base)]
    return [(recipe.stem, base), (f"{recipe.stem} (no fine-tune)", [*base, "finetune=null"])]


def summarise(label: str, model: str, report: dict) -> dict:
    table = report["validation"]["models"]
    original, converted = table["original"], table["converted"]
    row = {"model": model, "variant": label, "params": converted["params"], "macs": converted["macs"],
           "params_original": original["params"], "macs_original": original["macs"],
           "mac_ideal_speedup": original["macs"] / converted["macs"],
           "top1_original": original["top1"], "top1": converted["top1"], "agreement": converted["agreement"],
           "max_abs_diff": converted["parity"]["max_abs_diff"], "failed_gates": report["failed_gates"],
           "finetune": report["finetune"], "threads": report["validation"]["threads"], "latency": {}}
    for batch, ms in converted["latency"].items():
        base = original["latency"][batch]
        row["latency"][batch] = {"original_p50_ms": base["p50_ms"], "original_p90_ms": base["p90_ms"],
                                 "p50_ms": ms["p50_ms"], "p90_ms": ms["p90_ms"],
                                 "speedup": base["p50_ms"] / ms["p50_ms"]}
    return row


def markdown(results: dict) -> str:
    lines = [f"Measured {results['date']} on {results['machine']}; onnxruntime CPU, {'/'.join(map(str, results['threads']))} "
             "intra-op threads, median of interleaved runs (speed-up = original p50 / converted p50).", "",
             "| model | variant | params | MACs | MAC-ideal | b1 p50 ms (orig → conv) | b1 speed-up "
             "| b8 p50 ms (orig → conv) | b8 speed-up | top-1 orig → conv | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        b1, b8 = r["latency"].get("b1"), r["latency"].get("b8")
        top1 = f"{r['top1_original']:.2f} → {r['top1']:.2f}" if r["top1"] is not None else "n/a (random init)"
        agreement = f"{r['agreement'] * 100:.2f} %" if r["top1"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['params_original'] / 1e6:.2f} → {r['params'] / 1e6:.2f} M "
            f"| {r['macs_original'] / 1e6:.0f} → {r['macs'] / 1e6:.0f} M | {r['mac_ideal_speedup']:.2f}× "
            f"| {b1['original_p50_ms']:.2f} → {b1['p50_ms']:.2f} | {b1['speedup']:.2f}× "
            f"| {b8['original_p50_ms']:.1f} → {b8['p50_ms']:.1f} | {b8['speedup']:.2f}× | {top1} | {agreement} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", help="recipe names under recipes/ (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--runs", type=int, default=30, help="interleaved latency runs per model and batch size")
    args = parser.parse_args()
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    if args.recipes:
        recipes = [ROOT / "recipes" / f"{name}.yaml" for name in args.recipes]
    work = args.out / "runs"
    rows = []
    for model in args.models:
        for recipe in recipes:
            for label, overrides in variants(model, recipe):
                print(f"bench: {model} / {label}", file=sys.stderr, flush=True)
                report = convert(model, recipe, work / f"{model}-{label.replace(' ', '_')}", force=True,
                                 overrides=[*overrides, f"validate.latency_runs={args.runs}"],
                                 **MODELS[model]["args"])
                rows.append(summarise(label, model, report))
    shutil.rmtree(work, ignore_errors=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
               "threads": sorted({r["threads"] for r in rows}), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
