"""`vitcompress tune` measured (issue 33): a search on ``vit_fmnist196`` within a top-1 budget against the shipped
training-free recipes, ToMe alone and onnxruntime int8, with a replay of the best; and a latency-only search on
DeiT-S (random weights, no sensitivity seeding: the replay check needs none) whose whole front is replayed.

Every row is a real conversion through the library in this one process (``vitcompress.tune`` and
``vitcompress.convert``), timed in onnxruntime against its own original, interleaved, under the latency lock, at
batch 1 and 2 threads, on the same held-out images. Writes ``bench/tune_study.json`` and ``bench/tune_front.png``
(matplotlib), then has ``bench/pages.py`` rewrite the ``tune_study`` block of docs/benchmark.md.

    python bench/tune_study.py --part fmnist196 --trials 60   # baselines and the search
    python bench/tune_study.py --part shipped      # the shipped recipes with their own fine-tune (~1 h)
    python bench/tune_study.py --part retime       # quiet machine: confirm the front, replay, time every row again
    python bench/tune_study.py --part deit_s --trials 20

The ``shipped`` part converts every shipped recipe not among the training-free baselines, each with the
fine-tune it ships with, on ``vit_fmnist196`` under the same validation settings: the bar a search must clear.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pages

import vitcompress
from vitcompress.api import remeasure_latency
from vitcompress.errors import UsageError
from vitcompress.measure import machine_description
from vitcompress.original_cache import OriginalCache
from vitcompress.report import Report

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "tune_study.json"
#: Shipped recipes that convert without a fine-tune (the fine-tuned ones take ~8 min each on vit_fmnist196 here),
#: token merging alone at ToMe's DeiT-S rate, and the one-call onnxruntime int8 of the original.
BASELINES = [("fast.yaml", "fast", []), ("tome.yaml (ToMe r=3)", "tome", []),
             ("ToMe alone, r=13", "tome", ["steps.0.r=13"]),
             ("ORT dynamic int8 of the original", "fast", ["steps=[]", "export.quantize=dynamic"]),
             ("ORT static int8 of the original", "fast", ["steps=[]", "export.quantize=static"])]


#: The validation every baseline and shipped-recipe row shares (gates off: each row is a measurement).
SHARED = ["validate.batch_sizes=[1]", "validate.latency_runs=30", "validate.profile_runs=0",
          "validate.ladder_images=0", "validate.max_top1_drop=null", "validate.min_agreement=null",
          "validate.max_abs_diff=1.0"]


def _row(report: Report, seconds: float, max_drop: float | None) -> dict:
    converted, original = report.validation.models["converted"], report.validation.models["original"]
    mine, theirs = converted.latency[1], original.latency[1]
    drop = original.top1 - converted.top1 if converted.top1 is not None else 100 * (1 - converted.agreement)
    return {"speedup": theirs.p50_ms / mine.p50_ms, "latency_ms": mine.p50_ms, "original_ms": theirs.p50_ms,
            "spread": mine.spread, "top1": converted.top1, "original_top1": original.top1,
            "agreement": converted.agreement, "drop": drop, "seconds": seconds,
            "meets": None if max_drop is None else drop <= max_drop}


def _convert(model: str, recipe, cache: OriginalCache, max_drop: float | None, bundle: Path,
             overrides: list[str] | None = None, **kwargs) -> dict:
    """A row: ``recipe`` converted into ``bundle`` (kept, so :func:`retime` can time it again)."""
    shutil.rmtree(bundle, ignore_errors=True)
    started = time.perf_counter()
    result = vitcompress.convert(model, recipe, cache=cache, out_dir=bundle, overrides=overrides, **kwargs)
    return {**_row(result.report, time.perf_counter() - started, max_drop), "bundle": str(bundle),
            "recipe": str(recipe), "overrides": list(overrides or [])}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _front(result) -> list[dict]:
    return [{"file": p.file, "trial": p.trial, "summary": p.summary, "confirmed": p.confirmed,
             "trial_speedup": p.trial_measured.speedup if p.trial_measured else p.measured.speedup,
             **p.measured.model_dump()} for p in result.front]


def _finetune_steps(recipe) -> int:
    """Distillation steps a recipe runs (per stage times stages)."""
    if recipe.finetune is None:
        return 0
    return recipe.finetune.steps * max(len(recipe.finetune.stages or []), 1)


def shipped(images: int, max_drop: float, work: Path, write) -> dict:
    """Every shipped recipe outside :data:`BASELINES`, with its own fine-tune, on vit_fmnist196, the cheapest
    fine-tune first; ``write`` saves the part after each row (a long run that is stopped keeps its rows)."""
    from vitcompress.errors import VitCompressError
    from vitcompress.recipe import load_recipe, shipped_recipes

    cache = OriginalCache()
    taken = {recipe for _, recipe, _ in BASELINES}
    names = sorted((name for name in shipped_recipes() if name not in taken),
                   key=lambda name: (_finetune_steps(load_recipe(name)), name))
    part = {"model": "vit_fmnist196", "images": images, "max_drop": max_drop, "rows": {},
            "not_run": {f"{name}.yaml": _finetune_steps(load_recipe(name)) for name in names}}
    for name in names:
        label = f"{name}.yaml"
        try:
            part["rows"][label] = _convert("vit_fmnist196", name, cache, max_drop, work / "bundles" / _slug(label),
                                           [f"validate.images={images}", *SHARED], data="fmnist")
            part["rows"][label]["finetune_steps"] = part["not_run"][label]
        except VitCompressError as exc:
            part["rows"][label] = {"refused": str(exc)}
        del part["not_run"][label]
        print(name, part["rows"][label], flush=True)
        write(part)
    return part


def _tune_fmnist196(trials: int, images: int, max_drop: float, work: Path, confirm: int):
    return vitcompress.tune("vit_fmnist196", data="fmnist", max_drop=max_drop, trials=trials, images=images,
                            confirm=confirm, out_dir=work / "fmnist196")


def _search_rows(result) -> dict:
    return {"trials": result.trials, "refused": result.refused, "confirmed": result.confirmed,
            "front": _front(result), "best": _front(result)[0] if result.best else None,
            "points": [{"trial": p.trial, "speedup": p.measured.speedup, "drop": p.measured.drop}
                       for p in result.points]}


def fmnist196(trials: int, images: int, max_drop: float, work: Path) -> dict:
    """The baselines, then the search (no confirmation: :func:`retime` confirms on a quiet machine)."""
    shared = [f"validate.images={images}", *SHARED]
    cache = OriginalCache()
    baselines = {}
    for label, recipe, overrides in BASELINES:
        baselines[label] = _convert("vit_fmnist196", recipe, cache, max_drop, work / "bundles" / _slug(label),
                                    [*overrides, *shared], data="fmnist")
        print(label, baselines[label], flush=True)
    started = time.perf_counter()
    result = _tune_fmnist196(trials, images, max_drop, work, confirm=0)
    wall = time.perf_counter() - started
    sensitivity = json.loads((work / "fmnist196" / "sensitivity.json").read_text())
    return {"model": "vit_fmnist196", "data": "fmnist (train → calibration; test → held-out)", "images": images,
            "max_drop": max_drop, "wall_s": wall, "trials_requested": trials,
            "per_trial_s": sum(p.measured.seconds for p in result.points) / max(len(result.points), 1),
            "sensitivity_cells": sum(len(s["cells"]) for s in sensitivity["steps"]),
            **_search_rows(result), "replay": None, "baselines": baselines}


def retime(study: dict, work: Path, confirm: int, runs: int) -> dict:
    """On a quiet machine, after the search: the same tune command again (the study is complete, so it only
    confirms its front with replays), the best replayed once more with ``convert``, and every kept bundle
    (baselines, shipped recipes, the replay) timed again against its original with ``runs`` runs each."""
    part = study["fmnist196"]
    started = time.perf_counter()
    result = _tune_fmnist196(part["trials_requested"], part["images"], part["max_drop"], work, confirm=confirm)
    part.update(_search_rows(result), confirm_s=time.perf_counter() - started)
    cache = OriginalCache()
    if result.best is not None:
        part["replay"] = _convert("vit_fmnist196", work / "fmnist196" / result.best.file, cache, part["max_drop"],
                                  work / "bundles" / "tune-best-replay", data="fmnist")
    rows = [*part["baselines"].values(), *study.get("shipped", {}).get("rows", {}).values(),
            *([part["replay"]] if part["replay"] else [])]
    for row in (r for r in rows if "bundle" in r):
        try:
            report = remeasure_latency(row["bundle"], "vit_fmnist196", row["recipe"],
                                       overrides=[*row["overrides"], f"validate.latency_runs={runs}"],
                                       data="fmnist")
        except UsageError as exc:  # a cascade bundle: its latency is measured only inside its conversion
            row["not_retimed"] = str(exc)
            continue
        timed = _row(report, row["seconds"], part["max_drop"])
        row.update(first_speedup=row.get("first_speedup", row["speedup"]), speedup=timed["speedup"],
                   latency_ms=timed["latency_ms"], original_ms=timed["original_ms"], spread=timed["spread"],
                   retimed_runs=runs)
        print("retimed", row["recipe"], f"{row['first_speedup']:.2f}× → {row['speedup']:.2f}×", flush=True)
    part.update(retimed_at_load=os.getloadavg()[0], retime_runs=runs)
    return part


def deit_s(trials: int, work: Path) -> dict:
    started = time.perf_counter()
    result = vitcompress.tune("deit_s", random_init=True, data="synthetic", objective="latency", trials=trials,
                              images=64, sensitivity=False, out_dir=work / "deit_s")
    wall = time.perf_counter() - started
    cache = OriginalCache()
    front = _front(result)
    for entry in front:
        entry["replay"] = _convert("deit_s", work / "deit_s" / entry["file"], cache, None,
                                   work / "bundles" / f"deit-s-{entry['trial']}", data="synthetic", random_init=True)
        entry["replay_ratio"] = entry["replay"]["speedup"] / entry["speedup"]
    return {"model": "deit_s", "weights": "random", "objective": "latency", "trials": result.trials,
            "refused": result.refused, "confirmed": result.confirmed, "wall_s": wall,
            "per_trial_s": sum(p.measured.seconds for p in result.points) / max(len(result.points), 1),
            "front": front,
            "points": [{"trial": p.trial, "speedup": p.measured.speedup, "drop": p.measured.drop}
                       for p in result.points]}


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = study["fmnist196"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([p["drop"] for p in part["points"]], [p["speedup"] for p in part["points"]], s=14, c="0.6",
                 label="tune trials")
    front = sorted(part["front"], key=lambda p: p["drop"])
    axis.plot([p["drop"] for p in front], [p["speedup"] for p in front], "o-", c="#d62728", label="tune front")
    shipped = {f"{name} (fine-tuned)": row for name, row in study.get("shipped", {}).get("rows", {}).items()
               if "refused" not in row}
    for label, row in {**part["baselines"], **shipped}.items():
        axis.scatter([row["drop"]], [row["speedup"]], marker="s" if label in part["baselines"] else "^", s=40,
                     label=label)
    axis.axvline(part["max_drop"], ls="--", c="#1f77b4", lw=1)
    axis.set_xlabel("top-1 drop on held-out Fashion-MNIST (points)")
    axis.set_ylabel("speed-up over the original (ORT, batch 1, 2 threads)")
    axis.set_title(f"vit_fmnist196: tune ({part['trials']} trials) vs shipped and ORT-only ({study['date']})")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["shipped", "fmnist196", "retime", "deit_s"], required=True)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--images", type=int, default=1000, help="held-out images per trial (fmnist196)")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--confirm", type=int, default=5, help="retime: replays that confirm the front")
    parser.add_argument("--runs", type=int, default=90, help="retime: timed runs per model")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitcompress-tune-study",
                        help="kept between parts: the study and every row's bundle (retime times them again)")
    parser.add_argument("--wait-for", type=int, help="with both parts running at once: the other part's process id, "
                                                     "whose results this one writes after")
    args = parser.parse_args()
    commit = pages.source_commit(ROOT)
    load_before = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)

    def write(part: dict, key: str = args.part, extra: dict | None = None) -> None:
        part.update(date=datetime.date.today().isoformat(), machine=machine_description(), threads=2,
                    commit=commit, load_1min_after=os.getloadavg()[0], load_1min_before=load_before)
        study = json.loads(OUT.read_text()) if OUT.exists() else {}
        study.update({key: part, **(extra or {})})
        study["date"] = part["date"]
        OUT.write_text(json.dumps(study, indent=1) + "\n")
        if "fmnist196" in study:
            plot(study, ROOT / "bench" / "tune_front.png")
        pages.write(ROOT)

    if args.part == "retime":
        study = json.loads(OUT.read_text())
        part = retime(study, args.work, args.confirm, args.runs)
        write(part, "fmnist196", {"shipped": study["shipped"]} if "shipped" in study else None)
        return
    part = shipped(args.images, args.max_drop, args.work, write) if args.part == "shipped" \
        else fmnist196(args.trials, args.images, args.max_drop, args.work) if args.part == "fmnist196" \
        else deit_s(args.trials, args.work)
    while args.wait_for and Path(f"/proc/{args.wait_for}").exists():  # the other part writes the file first
        time.sleep(5)
    write(part)


if __name__ == "__main__":
    main()
