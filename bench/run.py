"""The benchmark behind every number in README.md (docs/benchmark.md).

For each shipped recipe, runs the real ``vitcompress convert`` pipeline through the Python API (see
:func:`runs_of` for which runs: accuracy on the embedded ``vit_fmnist`` with its Fashion-MNIST test split,
latency on ``deit_s`` with random weights, or on the recipe's own model), and collects what the reports measured:
params, MACs, MAC-ideal speed-up, onnxruntime latency at b1/b8 interleaved with the original in the same
process, measured speed-up, top-1 and agreement. The as-shipped runs are also measured against ORT dynamic
int8 quantisation (:mod:`ort_int8`): the recipe + int8 row, and each row's speed over the int8 original; the
``ort_int8`` entry is that baseline itself (no transform, original vs original + ORT int8). That four-way
interleaved run is also where an as-shipped row's latency comes from (the pipeline's own timing of the same two
models is cut to 3 runs), and no bench run profiles: the time goes to the measurements the tables show.

Each recipe's rows go to ``bench/results/<recipe>.json`` (with the date, machine, commit, package versions and
ONNX opset they were measured with, and the wall time of the recipe and of each run: ``wall_s``, ``int8_wall_s`` for
the int8 comparison), so a recipe can be re-measured alone; ``bench/results.json``, ``bench/results.md`` and
``bench/pareto.png`` are then rebuilt from all of those files, and ``bench/pages.py`` (the one renderer of the tables) rewrites the blocks of
README.md and docs/ that come from them.

    python bench/run.py                      # every recipe
    python bench/run.py --recipes svd        # re-measure one recipe, rebuild the tables
    python bench/run.py --tables-only        # rebuild results.md and the pages from bench/results/
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import pages
from ort_int8 import Originals, measure
from pages import bench_table, gate_cell, gates_table  # noqa: F401 (the renderers; gate_cell for callers)
from pareto import plot

from vitcompress.api import convert, machine_description
from vitcompress.export_config import ExportConfig
from vitcompress.original_cache import OriginalCache
from vitcompress.recipe import apply_overrides, load_recipe, parse_recipe, read_recipe_file
from vitcompress.report import Report

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "vit_fmnist"
LATENCY_MODEL = "deit_s"
LATENCY_ONLY = {"random_init": True, "data": "synthetic"}
# Every run: no per-block profile (the bench reports none; ~3.5 s a run on DeiT-S).
BENCH_OVERRIDES = ["validate.profile_runs=0"]
# A latency-only run (random weights) calibrates on 64 images instead of the recipe's 256–512: its rows report
# latency, and the deployed structure (fixed ranks, the number of skipped blocks) does not depend on how many
# images set the weights or chose the blocks. Saves ~50 s of whitening Gram products per SVD recipe on DeiT-S.
LATENCY_ONLY_OVERRIDES = ["calibration.images=64", "calibration.batch_size=32"]
# An as-shipped run's latency comes from the four-way interleaved run against ORT int8 (:func:`int8_rows`), so the
# pipeline's own timing of original and converted (the same two models) is cut to the minimum.
TIMED_ELSEWHERE = ["validate.latency_runs=3", "validate.warmup_runs=1"]
NO_GATES = ["finetune=null", "validate.max_top1_drop=null", "validate.min_agreement=null"]
# export.quantize=static makes model.onnx int8: its parity with the torch fp32 model is int8 rounding, so the
# variant's parity gate is the one docs/transforms/quantize.md suggests, 0.5.
_STATIC_INT8 = ("export.quantize: static", ["export.quantize=static", "validate.max_abs_diff=0.5"])
# Extra accuracy variants a recipe's issue asks to measure: (label suffix, overrides).
EXTRA_VARIANTS = {
    "taylor": [("paper's channel centring, no fine-tune", ["steps.0.center=channels", "finetune=null"])],
    "fast": [_STATIC_INT8],
}
# Extra latency variants on the latency model: (label suffix, overrides).
_MOE_ONLY = "steps=[{transform: shiftadd_moe, targets: ['re:blocks\\.\\d+\\.mlp\\.fc[12]'], dispatch: %s}]"
LATENCY_VARIANTS = {
    "fast": [_STATIC_INT8, ("timm-form attention, export.head_major: false", ["export.head_major=false"])],
    "shift_mlp": [("float power-of-two weights, no int8", ["steps.0.int8=false"])],
    "shiftadd_paper": [("MoE only, (a) dense both + Where", [_MOE_ONLY % "where"]),
                       ("MoE only, (b) gather/scatter", [_MOE_ONLY % "gather"])],
}


BASELINE = "ort_int8"


def recipe_sha256(recipe: Path) -> str:
    """sha256 of a recipe's content as written (canonical JSON of its YAML, so comments and layout do not count):
    a results file holding another recipe's digest is stale, and ``tests/e2e/test_shipped_gates.py`` says so."""
    if recipe.stem == BASELINE:
        return BASELINE
    return hashlib.sha256(json.dumps(read_recipe_file(recipe), sort_keys=True).encode()).hexdigest()


def source_commit() -> str:
    """The git commit the bench ran on, ``+dirty`` when tracked files differ from it (what a results file was
    measured with is then not exactly that commit); ``unknown`` outside a git checkout. What the bench and
    ``bench/pages.py`` themselves write (every non-Python file under bench/, README.md, docs/) does not count:
    :func:`main` records the commit once, at the start of the run, and a run rewriting its own results files is
    not a change to what was measured."""
    return pages.source_commit(ROOT)


def runs_of(recipe: Path) -> list[tuple[str, str, list[str], dict]]:
    """(model, label, overrides, convert kwargs) of every run the bench makes of one recipe.

    A recipe for the reference model or for DeiT-S (whose weights cannot be fetched here) is measured for accuracy
    on the reference model as shipped, without its fine-tune (when it has one) and in any extra variant, then for
    latency on DeiT-S (random weights). A recipe for another model is latency only.
    The first run of each model is the as-shipped one, which :func:`int8_rows` also compares with ORT int8.
    """
    if recipe.stem == BASELINE:
        return [(REFERENCE, "original", [], {}), (LATENCY_MODEL, "original", [], LATENCY_ONLY)]
    loaded = load_recipe(recipe)
    model = loaded.model or REFERENCE
    if model not in (REFERENCE, LATENCY_MODEL):
        return [(model, recipe.stem, NO_GATES, LATENCY_ONLY)]
    runs = [(REFERENCE, recipe.stem, [], {})]
    if loaded.finetune is not None:  # without one, the no-fine-tune run would repeat the first
        runs.append((REFERENCE, f"{recipe.stem} (no fine-tune)", ["finetune=null"], {}))
    runs += [(REFERENCE, f"{recipe.stem} ({label})", extra, {}) for label, extra in EXTRA_VARIANTS.get(recipe.stem, [])]
    runs += [(LATENCY_MODEL, recipe.stem, NO_GATES, LATENCY_ONLY)]
    return runs + [(LATENCY_MODEL, f"{recipe.stem} ({label})", [*NO_GATES, *extra], LATENCY_ONLY)
                   for label, extra in LATENCY_VARIANTS.get(recipe.stem, [])]


def run_convert(recipe: Path, model: str, overrides: list[str], kwargs: dict, out: Path, runs: int,
                timed_elsewhere: bool = False, cache: OriginalCache | None = None) -> Report:
    """The pipeline on one run; the ``ort_int8`` baseline converts with no transform and no fine-tune.
    ``timed_elsewhere``: the run's latency will come from :func:`ort_int8.measure` (see :data:`TIMED_ELSEWHERE`)."""
    timing = TIMED_ELSEWHERE if timed_elsewhere else [f"validate.latency_runs={runs}"]
    overrides = [*overrides, *BENCH_OVERRIDES, *timing, *(LATENCY_ONLY_OVERRIDES if kwargs == LATENCY_ONLY else [])]
    if recipe.stem == BASELINE:
        baseline = apply_overrides({"steps": [], "finetune": None}, overrides, BASELINE)
        return convert(model, parse_recipe(baseline, BASELINE), out_dir=out, force=True, cache=cache,
                       **kwargs).report
    return convert(model, recipe, out_dir=out, force=True, overrides=overrides, cache=cache, **kwargs).report


def four_way_latency(timing: dict, name: str) -> dict:
    """A row's ``latency`` cells for model ``name`` of the four-way run, against the original of that run."""
    original = timing["original"]
    return {b: {"original_p50_ms": original[b]["p50_ms"], "original_p90_ms": original[b]["p90_ms"],
                "p50_ms": ms["p50_ms"], "p90_ms": ms["p90_ms"], "spread": ms["spread"],
                "speedup": original[b]["p50_ms"] / ms["p50_ms"]}
            for b, ms in timing[name].items()}


def int8_rows(row: dict, int8: dict) -> list[dict]:
    """Each row's speed over the int8 original (b1/b8, same interleaved run) and its latency from that run, plus
    the recipe + int8 row (or, for the baseline, the int8 original's row)."""
    timing = int8["latency"]
    baseline, quantised = "original + ORT int8", "converted + ORT int8"
    row["latency"] = four_way_latency(timing, "converted")
    row["vs_ort_int8"] = {b: timing[baseline][b]["p50_ms"] / timing["converted"][b]["p50_ms"] for b in timing[baseline]}
    is_baseline = row["variant"] == "original"
    name = baseline if is_baseline else quantised
    extra = {**row, "variant": "original + ORT int8" if is_baseline else f"{row['variant']} + ORT int8",
             "top1": int8["top1"][name], "agreement": int8["agreement"][name],
             "latency": four_way_latency(timing, name),
             "failed_gates": None, "gates": None,  # quantised by the bench, not by the recipe: no gates ran
             "vs_ort_int8": {b: timing[baseline][b]["p50_ms"] / timing[name][b]["p50_ms"] for b in timing[name]}}
    return [row, extra]


def summarise(label: str, model: str, report: Report) -> dict:
    """The bench's row (its own JSON format, see results/) of one convert report."""
    table = report.validation.models
    original, converted = table["original"], table["converted"]
    row = {"model": model, "variant": label, "params": converted.params, "macs": converted.macs,
           "params_original": original.params, "macs_original": original.macs,
           "mac_ideal_speedup": original.macs / converted.macs,
           "top1_original": original.top1, "top1": converted.top1, "agreement": converted.agreement,
           "max_abs_diff": converted.parity.max_abs_diff, "failed_gates": report.failed_gates,
           "gates": [gate.model_dump() for gate in report.validation.gates],
           "finetune": report.finetune and report.finetune.model_dump(),
           "threads": report.validation.threads, "latency": {}}
    if report.validation.expert_shares is not None:
        row["expert_shares"] = report.validation.expert_shares["overall"]
    if report.export.moe_dispatch is not None:
        row["moe_dispatch"] = report.export.moe_dispatch.model_dump()
    for batch, ms in converted.latency.items():
        base = original.latency[batch]
        row["latency"][f"b{batch}"] = {"original_p50_ms": base.p50_ms, "original_p90_ms": base.p90_ms,
                                 "p50_ms": ms.p50_ms, "p90_ms": ms.p90_ms, "spread": ms.spread,
                                 "speedup": base.p50_ms / ms.p50_ms}
    return row




def rebuild_tables(out: Path) -> str:
    """Rebuild ``results.json`` (all recipes), ``results.md`` and ``pareto.png`` from every ``results/<recipe>.json``,
    then, when ``out`` is this repository's bench/, the pages' blocks (``bench/pages.py``); returns the table."""
    results = {path.stem: json.loads(path.read_text()) for path in sorted((out / "results").glob("*.json"))
               if not path.stem.endswith(".partial")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = bench_table(results)
    image = "\n![accuracy vs latency on vit_fmnist](pareto.png)\n" if plot(results, out / "pareto.png") else ""
    (out / "results.md").write_text(table + image)
    if out.resolve() == (ROOT / "bench").resolve():
        pages.write(ROOT)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", help=f"recipe names under recipes/, or {BASELINE} (default: {BASELINE} and every recipe)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--runs", type=int, default=30, help="interleaved latency runs per model and batch size")
    parser.add_argument("--tables-only", action="store_true", help="only rebuild results.md and the pages' tables")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the latency runs (random weights), not the reference model's accuracy runs")
    parser.add_argument("--shipped-only", action="store_true",
                        help="only each model's as-shipped run (the rows the gates are checked on) and its int8 "
                             "comparison, not the no-fine-tune and extra variants")
    args = parser.parse_args()
    recipes = [ROOT / "recipes" / f"{BASELINE}.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))]
    if args.recipes:
        recipes = [ROOT / "recipes" / f"{name}.yaml" for name in args.recipes]
    work = args.out / "runs"
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    originals = Originals(work)
    cache = OriginalCache()  # every recipe's conversion of a model shares its original's export and predictions
    commit = source_commit()  # once, before this run rewrites any results file
    for recipe in [] if args.tables_only else recipes:
        rows, partial, measured = [], args.out / "results" / f"{recipe.stem}.partial.json", set()
        versions, started = {}, time.perf_counter()
        for model, label, overrides, kwargs in runs_of(recipe):
            if args.latency_only and kwargs != LATENCY_ONLY or args.shipped_only and model in measured:
                continue
            print(f"bench: {model} / {label}", file=sys.stderr, flush=True)
            run_started = time.perf_counter()
            report = run_convert(recipe, model, overrides, kwargs, work / "run", args.runs,
                                 timed_elsewhere=model not in measured, cache=cache)
            versions = report.versions
            wall_s = time.perf_counter() - run_started
            row = summarise(label, model, report)
            if model not in measured:  # the as-shipped run of this model: against ORT int8 too
                measured.add(model)
                print(f"bench: {model} / {label} vs ORT int8", file=sys.stderr, flush=True)
                run_started = time.perf_counter()
                int8 = measure(originals, model, kwargs == LATENCY_ONLY, work / "run", args.runs,
                               report.validation.threads)
                rows += int8_rows(row, int8)  # the + ORT int8 row copies the row: it gets no wall times
                row["int8_wall_s"] = time.perf_counter() - run_started
            else:
                rows.append(row)
            row["wall_s"] = wall_s
            partial.write_text(json.dumps(rows, indent=2))  # what is measured so far survives an interruption
        results = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                   "recipe_sha256": recipe_sha256(recipe), "commit": commit, "versions": versions,
                   "opset": (ExportConfig() if recipe.stem == BASELINE else load_recipe(recipe).export).opset,
                   "threads": sorted({r["threads"] for r in rows}), "wall_s": time.perf_counter() - started,
                   "rows": rows}
        (args.out / "results" / f"{recipe.stem}.json").write_text(json.dumps(results, indent=2))
        partial.unlink()
    shutil.rmtree(work, ignore_errors=True)
    print(rebuild_tables(args.out))


if __name__ == "__main__":
    main()
