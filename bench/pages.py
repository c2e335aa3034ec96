"""The one renderer of every benchmark number in README.md and docs/: each generated block of a page (between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``) is rendered here from the results file the bench scripts wrote,
and only here. The bench scripts write results files; this writes the pages.

    python bench/pages.py            # rewrite every block of README.md and docs/**/*.md from bench/ results
    python bench/pages.py --check    # exit 1, naming page and block, where a page disagrees with its results

Importing this module imports no torch and no vitcompress (the docs test uses :func:`check`). Every function takes
the repository root as a parameter, so a copy of the pages can be checked.

Blocks (name: results file):

- ``headline``: bench/results/*.json, DeiT-S speed-up and vit_fmnist accuracy per shipped recipe (README);
- ``bench``, ``gates``: bench/results/*.json (bench/run.py), the full table and every as-shipped run's gates;
- ``skip_study``: bench/skip_study.json (bench/skip_study.py);
- ``token_count``: bench/token_count.json (bench/token_count.py);
- ``quant_latency``, ``quant_calibration``: bench/quant_study.json (bench/quant_study.py);
- ``shiftadd_study``: bench/shiftadd_study.json (bench/shiftadd_study.py);
- ``shiftadd_blocks``: bench/shiftadd_blocks.json (bench/shiftadd_blocks.py);
- ``deploy``: bench/deploy.json (bench/deploy.py);
- ``golden_tolerance``: bench/golden_tolerance.json (bench/golden_tolerance.py);
- ``tune_study``: bench/tune_study.json (bench/tune_study.py);
- ``convert_walltime``: bench/convert_walltime.json (bench/convert_walltime.py);
- ``finetune_throughput``: bench/finetune_throughput.jsonl (bench/finetune_throughput.py; the last row of each
  configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- ([A-Za-z0-9_]+):start -->\n(.*?)<!-- \1:end -->", re.S)
BASELINE = "ort_int8"
LATENCY_MODEL = "deit_s"
REFERENCE = "vit_fmnist"


# ---------------------------------------------------------------------------------------------- results files

def load_results(root: Path) -> dict[str, dict]:
    """Every recipe's ``bench/results/<recipe>.json`` (not the ``.partial`` ones of an unfinished run)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((root / "bench" / "results").glob("*.json"))
            if not path.stem.endswith(".partial")}


def _json(root: Path, name: str) -> dict:
    return json.loads((root / "bench" / name).read_text())


def _generated(path: str) -> bool:
    """A file the bench scripts or this module write: any non-Python file under bench/, README.md, docs/."""
    return path == "README.md" or path.startswith("docs/") or (path.startswith("bench/") and not path.endswith(".py"))


def source_commit(root: Path = ROOT) -> str:
    """The git commit of ``root``, ``+dirty`` when a tracked file other than the generated ones (:func:`_generated`)
    differs from it; ``unknown`` outside a git checkout. Record it once, before a run rewrites its results."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "-z"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # -z: "XY path\0", a rename adds its source path as the next entry
    changed = [entry[3:] for entry in status.split("\0") if len(entry) > 3]
    dirty = any(not _generated(path) for path in changed)
    return head.stdout.strip() + ("+dirty" if dirty else "")


def short_commit(commit: str | None) -> str:
    """``263f19a`` or ``263f19a+dirty`` of a full commit; ``unknown`` when none was recorded."""
    if not commit:
        return "not recorded"
    head, _, dirty = commit.partition("+")
    return head[:7] + (f"+{dirty}" if dirty else "")


def measured_lines(results: dict[str, dict]) -> list[str]:
    """One line per (date, machine, threads, commit) saying which recipes were measured there."""
    when: dict[tuple[str, str, str, str], list[str]] = {}
    for recipe, res in results.items():
        threads = "/".join(map(str, res["threads"]))
        when.setdefault((res["date"], res["machine"], threads, short_commit(res.get("commit"))), []).append(recipe)
    return [f"Measured {date} on {machine}; onnxruntime CPU, {threads} intra-op threads; commit `{commit}` "
            f"({', '.join(names)})." for (date, machine, threads, commit), names in sorted(when.items())]


# ------------------------------------------------------------------------------------- bench/results/*.json

def gate_cell(row: dict) -> str:
    """✓ and how many gates passed, or ✗ and each failed gate's value against its limit; — where none ran (rows
    measured before the bench kept each gate's value have only the names of the failed ones)."""
    if "gates" not in row:
        return "✓" if row["failed_gates"] == [] else "✗ " + ", ".join(row["failed_gates"])
    gates = row["gates"]
    if gates is None:
        return "—"
    failed = [g for g in gates if g["passed"] is False]
    if not failed:
        return f"✓ {sum(g['passed'] is True for g in gates)}/{len(gates)}"
    return "✗ " + "; ".join(f"{g['gate']} {g['value']:.4g} vs {g['limit']:g}" for g in failed)


def spread_cell(timing: dict) -> str:
    """`` (±x %)``: the converted model's (p90 − p10) / p50 over the runs, where the row recorded it."""
    return f" (±{timing['spread'] * 50:.0f} %)" if "spread" in timing else ""


def row_line(r: dict) -> str:
    b1, b8 = r["latency"].get("b1"), r["latency"].get("b8")
    versus = " / ".join(f"{r['vs_ort_int8'][b]:.2f}×" for b in ("b1", "b8")) if "vs_ort_int8" in r else "—"
    top1 = f"{r['top1_original']:.2f} → {r['top1']:.2f}" if r["top1"] is not None else "n/a (random init)"
    agreement = f"{r['agreement'] * 100:.2f} %" if r["top1"] is not None else "n/a"
    return (f"| {r['model']} | {r['variant']} | {r['params_original'] / 1e6:.2f} → {r['params'] / 1e6:.2f} M "
            f"| {r['macs_original'] / 1e6:.0f} → {r['macs'] / 1e6:.0f} M | {r['mac_ideal_speedup']:.2f}× "
            f"| {b1['original_p50_ms']:.2f} → {b1['p50_ms']:.2f}{spread_cell(b1)} | {b1['speedup']:.2f}× "
            f"| {b8['original_p50_ms']:.1f} → {b8['p50_ms']:.1f}{spread_cell(b8)} | {b8['speedup']:.2f}× | {versus} "
            f"| {top1} | {agreement} "
            f"| {gate_cell(r)} |")


def bench_table(results: dict[str, dict]) -> str:
    """One table over every recipe's results (``{recipe: results}``), saying when, where and on which commit each
    was measured. Also ``bench/results.md`` (bench/run.py)."""
    lines = measured_lines(results)
    lines += ["", "Median of interleaved runs (± half the converted model's p10–p90 range, as a % of its median, "
              "where recorded); speed-up = original p50 / converted p50. *vs ORT int8*: speed over "
              "the original quantised with onnxruntime's `quantize_dynamic` (int8 weights, dynamic uint8 "
              "activations), b1 / b8, from one interleaved run of original, original + int8, converted "
              "and converted + int8, which is also where an as-shipped row's own latency comes from; a `+ ORT int8` "
              "row is the converted model quantised the same way "
              "(its latency is from that run). *gates*: the recipe's own gates on that run (✓ passed/ran, "
              "or ✗ with each failed gate's value vs its limit); deit_s rows have random weights, so only the "
              "parity gate (`max_abs_diff`) runs there; `+ ORT int8` rows are the bench's, not gated.", "",
              "| model | variant | params | MACs | MAC-ideal | b1 p50 ms (orig → conv) | b1 speed-up "
              "| b8 p50 ms (orig → conv) | b8 speed-up | vs ORT int8 (b1 / b8) | top-1 orig → conv | agreement | gates |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row_line(r) for res in results.values() for r in res["rows"]]
    return "\n".join(lines) + "\n"


def gates_table(results: dict[str, dict]) -> str:
    """Per shipped recipe and model, its as-shipped run's gates: each one's value against its limit."""
    lines = ["| recipe | model | measured | gates (value vs limit) | result |", "|---|---|---|---|---|"]
    for recipe, res in results.items():
        for row in (r for r in res["rows"] if r["variant"] == recipe):
            if "gates" in row:
                cells = ", ".join(f"{g['gate']} {g['value']:.4g} {'≤' if g['gate'].startswith('max') else '≥'} "
                                  f"{g['limit']:g}" for g in row["gates"] if g["value"] is not None)
            else:  # measured before rows kept their gates: the values, and which gates failed
                cells = f"max_abs_diff {row['max_abs_diff']:.4g}" + (
                    f", top-1 drop {row['top1_original'] - row['top1']:.4g}, agreement {row['agreement']:.4g}"
                    if row["top1"] is not None else "")
            lines.append(f"| {recipe} | {row['model']} | {res['date']}, {res['machine']}, commit "
                         f"`{short_commit(res.get('commit'))}` | {cells} | {gate_cell(row)} |")
    return "\n".join(lines) + "\n"


def _bench(root: Path, page: Path) -> str:
    image = root / "bench" / "pareto.png"
    link = f"\n![accuracy vs latency on vit_fmnist]({relative(image, page)})\n" if image.exists() else ""
    return bench_table(load_results(root)) + link


def _gates(root: Path, page: Path) -> str:
    return gates_table(load_results(root))


def headline_table(results: dict[str, dict], full_table: str) -> str:
    """Per shipped recipe: its as-shipped DeiT-S (random weights) speed-up over the fp32 original and over ORT int8
    of the original, b1 / b8, and its as-shipped accuracy on the reference model."""
    lines = measured_lines(results)
    lines += ["", f"Speed-up: onnxruntime CPU p50 latency of the original / the converted model, same-run interleaved, "
              f"batch 1 / batch 8, DeiT-S at 224 with random weights (the recipe's own model where it names another). "
              f"Accuracy: Fashion-MNIST test top-1 of the reference model `{REFERENCE}`. All rows, variants and "
              f"spreads: [{full_table.split('#')[0].split('/')[-1]}]({full_table}).", "",
              "| recipe | latency model | speed-up b1 / b8 | vs ORT int8 b1 / b8 | vit_fmnist top-1 (orig → conv) "
              "| agreement | gates |", "|---|---|---|---|---|---|---|"]
    ordered = sorted(results.items(), key=lambda item: item[0] != BASELINE)  # the baseline first
    for recipe, res in ordered:
        variant = "original + ORT int8" if recipe == BASELINE else recipe
        rows = [r for r in res["rows"] if r["variant"] == variant]
        latency = next((r for r in rows if r["model"] != REFERENCE), None)
        accuracy = next((r for r in rows if r["model"] == REFERENCE), None)
        if latency is None:
            continue
        speed = " / ".join(f"{latency['latency'][b]['speedup']:.2f}×" for b in ("b1", "b8"))
        versus = (" / ".join(f"{latency['vs_ort_int8'][b]:.2f}×" for b in ("b1", "b8"))
                  if "vs_ort_int8" in latency else "—")
        scored = accuracy is not None and accuracy["top1"] is not None
        top1 = f"{accuracy['top1_original']:.2f} → {accuracy['top1']:.2f}" if scored else "—"
        agreement = f"{accuracy['agreement'] * 100:.2f} %" if scored else "—"
        gates = gate_cell(accuracy) if accuracy else gate_cell(latency)
        name = f"{BASELINE} (baseline: ORT dynamic int8 of the original)" if recipe == BASELINE else f"`{recipe}`"
        lines.append(f"| {name} | {latency['model']} | {speed} | {versus} | {top1} | {agreement} | {gates} |")
    return "\n".join(lines) + "\n"


def _headline(root: Path, page: Path) -> str:
    return headline_table(load_results(root), relative(root / "docs" / "benchmark.md", page) + "#the-table")


# ------------------------------------------------------------------------------------------ study results

def skip_study_tables(results: dict) -> str:
    """bench/skip_study.json's tables (also ``bench/skip_study.md``, bench/skip_study.py)."""
    s = results["settings"]
    lines = [f"Measured {results['date']} on {results['machine']} (CPU shared with other work); onnxruntime CPU, "
             f"2 intra-op threads; commit {short_commit(results.get('commit'))}. Accuracy on the first {s['images']} "
             f"Fashion-MNIST test images; fine-tune {s['steps']} steps, batch 64, for every variant.", "",
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


def token_count_table(results: dict) -> str:
    """bench/token_count.json's table (bench/token_count.py)."""
    lines = [f"Measured {results['date']} on {results['machine']}; onnxruntime CPU, 2 intra-op threads; commit "
             f"{short_commit(results.get('commit'))}; top-1 on the first {results['images']} Fashion-MNIST test "
             f"images; latency: median of {results['runs']} interleaved runs against the model's own original.", "",
             "| variant | model | top-1 orig → conv | agreement | MAC-ideal | b1 p50 ms (orig → conv) | b1 speed-up "
             "| b8 p50 ms (orig → conv) | b8 speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        b1, b8 = r["latency"]["b1"], r["latency"]["b8"]
        lines.append(f"| {r['variant']} | {r['model']} | {r['top1_original']:.2f} → {r['top1']:.2f} "
                     f"| {r['agreement'] * 100:.2f} % | {r['mac_ideal_speedup']:.2f}× "
                     f"| {b1['original_p50_ms']:.2f} → {b1['p50_ms']:.2f} | {b1['speedup']:.2f}× "
                     f"| {b8['original_p50_ms']:.1f} → {b8['p50_ms']:.1f} | {b8['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


QUANT_LABELS = {"ORT dynamic": "ORT dynamic int8 of the original", "static": "static int8 of the original",
                "fast fp32": "fast (float32)", "fast + dynamic": "fast + dynamic int8",
                "fast + static": "fast + static int8 (as shipped: layer outputs float32)",
                "fast + static (int8 activations)": "fast + static int8, int8 activations",
                "fast + static (layer outputs quantised)":
                    "fast + static int8, layer outputs quantised too (onnxruntime's default)"}


def quant_latency_table(study: dict) -> str:
    """bench/quant_study.json → latency: DeiT-S (random init) speed over float32 of each quantised form."""
    lat = study["latency"]
    fp32 = lat["fp32"]
    spread = max(ms["p90_ms"] / ms["p50_ms"] for name, by in lat.items() if isinstance(by, dict) and "b1" in by
                 for ms in by.values())
    lines = [f"Measured {lat['date']} on {lat['machine']}; onnxruntime CPU, {lat['threads']} intra-op threads, "
             f"{lat['runs']} interleaved runs ({lat['warmup']} warm-up); commit {short_commit(lat.get('commit'))}. "
             f"DeiT-S (random init), p50 speed-up over the float32 original ({fp32['b1']['p50_ms']:.1f} ms at b1, "
             f"{fp32['b8']['p50_ms']:.0f} ms at b8); p90/p50 ≤ {spread:.2f} for every model.", "",
             "| model | b1 | b8 |", "|---|---|---|"]
    for name, label in QUANT_LABELS.items():
        if name in lat:
            b1, b8 = (lat[name][b]["speedup_vs_fp32"] for b in ("b1", "b8"))
            lines.append(f"| {label} | {b1:.2f}× | {b8:.2f}× |")
    return "\n".join(lines) + "\n"


def quant_calibration_table(study: dict) -> str:
    """bench/quant_study.json → calibration: accuracy and time of each static calibration method."""
    cal = study["calibration"]
    lines = [f"Measured {cal['date']} on {cal['machine']}; commit {short_commit(cal.get('commit'))}. "
             f"{cal['model']}, {cal['calibration_images']} calibration images, top-1 on the first "
             f"{cal['test_images']} Fashion-MNIST test images.", "",
             "| calibration_method | top-1 % | agreement | calibration s |", "|---|---|---|---|"]
    for name, m in cal["methods"].items():
        seconds = f"{m['calibration_s']:.1f}" if "calibration_s" in m else "—"
        lines.append(f"| {name} | {m['top1']:.2f} | {m['agreement'] * 100:.2f} % | {seconds} |")
    return "\n".join(lines) + "\n"


def shiftadd_study_table(study: dict) -> str:
    """bench/shiftadd_study.json: latency of the ShiftAddViT variants against fp32 and ORT int8 of the original."""
    timing = study["latency"]
    lines = [f"Measured {study['date']} on {study['machine']}; onnxruntime CPU, {study['threads']} intra-op threads, "
             f"{study['runs']} interleaved runs; commit {short_commit(study.get('commit'))}. {study['model']} random "
             f"weights, MoE routers set to send {study['shift_share'] * 100:.0f} % of the tokens to the shift expert. "
             "*spread*: (p90 − p10) / p50.", "",
             "| variant | b1 ms (spread) | b8 ms (spread) | vs fp32 b1 / b8 | vs ORT int8 b1 / b8 |",
             "|---|---|---|---|---|"]
    for name, by_batch in timing.items():
        cells = [f"{by_batch[b]['p50_ms']:.1f} ({by_batch[b]['spread']:.2f})" for b in ("b1", "b8")]
        ratio = {ref: " / ".join(f"{timing[ref][b]['p50_ms'] / by_batch[b]['p50_ms']:.2f}×" for b in ("b1", "b8"))
                 for ref in ("original", "original + ORT int8")}
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio['original']} | {ratio['original + ORT int8']} |")
    return "\n".join(lines) + "\n"


def shiftadd_blocks_table(study: dict) -> str:
    """bench/shiftadd_blocks.json: vit_fmnist top-1 with binary attention in one block at a time."""
    blocks = study["binary_attention_in_block"]
    return "\n".join([
        f"Measured {study['date']} on {study['machine']}; torch, no fine-tune, first {study['images']} Fashion-MNIST "
        f"test images; commit {short_commit(study.get('commit'))}.", "",
        "| block | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks),
        f"| top-1 % (original {study['original']:.2f}) | " + " | ".join(f"{v:.2f}" for v in blocks.values()) + " |",
    ]) + "\n"


def deploy_table(result: dict) -> str:
    """bench/deploy.json: bundle size, verify time, predict throughput and start-up of the reference bundle."""
    mb, sizes = 1e-6, result["files"]
    golden = sum(v for k, v in sizes.items() if k.startswith("golden/"))
    optional = sizes.get("model.opt.onnx", 0) + sizes.get("model.ort", 0)
    lines = [f"Measured {result['date']} on {result['cpu']}; onnxruntime {result['threads']} intra-op threads; "
             f"commit {short_commit(result.get('commit'))}; load average {result['load_average_1min']:.1f} (1 min) "
             f"at the end of the run. Bundle of {result['model']}, with `model.opt.onnx` (basic) and `model.ort`.", "",
             "| what | measured |", "|---|---|",
             f"| bundle size | {result['bundle_bytes'] * mb:.1f} MB: `model.onnx` {sizes['model.onnx'] * mb:.1f}, "
             f"`model.safetensors` {sizes['model.safetensors'] * mb:.1f}, `model.opt.onnx` "
             f"{sizes['model.opt.onnx'] * mb:.1f}, `model.ort` {sizes['model.ort'] * mb:.1f}, "
             f"`golden/` {golden * mb:.2f} MB "
             f"({(result['bundle_bytes'] - optional) * mb:.1f} MB without the two optional files) |",
             f"| `vitcompress verify` | {result['verify_cli_s']:.2f} s as a command (Python start included), "
             f"{result['verify_checks_s']:.2f} s of checks (median of 3) |"]
    for batch, rate in result["predict_images_per_s"].items():
        lines.append(f"| `vitcompress predict`, batch {batch[1:]} | {rate:.0f} images/s ({result['images']} "
                     "Fashion-MNIST PNGs: decode, preprocess, onnxruntime; median of 5 rounds, batch sizes interleaved) |")
    for name, ms in result["startup_ms"].items():
        lines.append(f"| start-up `{name}` | {ms:.1f} ms (session creation + first run, median of 7, interleaved) |")
    return "\n".join(lines) + "\n"


def golden_tolerance_table(result: dict) -> str:
    """bench/golden_tolerance.json: the largest |Δ logits| per precision between onnxruntime configurations on one
    CPU (the proxy for another CPU's kernels; not a cross-CPU measurement)."""
    lines = [f"Measured {result['date']} on {result['cpu']} ({', '.join(result['isa'])}); onnxruntime "
             f"{result['onnxruntime']}; commit {short_commit(result.get('commit'))}; one kind of CPU only: "
             f"{result['images']} Fashion-MNIST test images through vit_fmnist, golden = {result['golden']['threads']} "
             f"intra-op threads and `ORT_ENABLE_ALL`, against 1–2 threads × `ORT_DISABLE_ALL`/`BASIC`/`ALL`.", "",
             r"| model | largest max \|Δ logits\| | top-1 equal | largest \|logit\| |", "|---|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        worst = max(rows, key=lambda r: r["max_abs_diff"])
        lines.append(f"| {model} | {worst['max_abs_diff']:.2e} ({worst['threads']} thread"
                     f"{'s' if worst['threads'] > 1 else ''}, "
                     f"{worst['graph_optimization']}) | {min(r['top1_equal'] for r in rows)}/{worst['images']} | "
                     f"{worst['max_abs_logit']:.2f} |")
    return "\n".join(lines) + "\n"


def finetune_throughput_table(rows: list[dict]) -> str:
    """bench/finetune_throughput.jsonl: fine-tune img/s of vit_fmnist per configuration (the last row of each)."""
    last = {r["config"]: r for r in rows}
    first = next(iter(last.values()))
    lines = [f"Measured {first['date']} on {first['cpu']}; {first['steps']} steps, global batch "
             f"{first['global_batch']}, through `vitcompress convert`; commit {short_commit(first.get('commit'))}; "
             f"load average (1 min) {min(r['load_1min_before'] for r in last.values()):.2f}–"
             f"{max(r['load_1min_after'] for r in last.values()):.2f}.", "",
             "| configuration | processes × threads | precision | img/s |", "|---|---|---|---:|"]
    for r in last.values():
        lines.append(f"| {r['config']} | {r['world_size']} × {r['threads_per_process']} | {r['precision']} "
                     f"| {r['images_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def tune_study_tables(study: dict) -> str:
    """bench/tune_study.json: tune on vit_fmnist196 against the training-free shipped recipes, ToMe alone and ORT
    int8 (each timed against its own original, interleaved, batch 1), with the best recipe replayed by convert;
    and the latency-only DeiT-S search's front, replayed."""
    lines: list[str] = []
    part = study.get("fmnist196")
    if part:
        lines += [f"Measured {part['date']} on {part['machine']}; onnxruntime CPU, {part['threads']} intra-op "
                  f"threads, batch 1, {part['images']} held-out Fashion-MNIST test images; commit "
                  f"{short_commit(part.get('commit'))}. `vitcompress tune vit_fmnist196 --data fmnist --max-drop "
                  f"{part['max_drop']:g} --trials {part['trials']}`: {part['trials']} trials ({part['refused']} refused "
                  f"combinations) in {part['wall_s'] / 60:.0f} min, {part['per_trial_s']:.0f} s per trial, after a "
                  f"sensitivity map of {part['sensitivity_cells']} cells; {len(part['front'])} recipes on the front"
                  + (f"; {part['confirmed']} trials confirmed by a replay (the front's, and any that a "
                     "replay moved off it)" if part.get("confirmed", 0) > len(part["front"]) else
                     ", each confirmed by a replay" if part.get("confirmed") else "") + "."
                  + (f" Then, with the search over (load average {part['retimed_at_load']:.1f}), every row's bundle "
                     f"was timed again against its original, {part['retime_runs']} runs each, interleaved: the "
                     "speed-ups below; the first column of timings is each row's own, taken while the search or "
                     "the fine-tunes shared the machine." if "retimed_at_load" in part else ""),
                  "", f"| conversion | speed-up b1 | first timing | top-1 drop (pt) | agreement | "
                      f"within {part['max_drop']:g} pt |", "|---|---:|---:|---:|---:|---|"]
        rows = list(part["baselines"].items())
        shipped = study.get("shipped", {}).get("rows", {})
        rows += [(f"{name} (its own fine-tune" + ("; timed in its conversion only, a cascade is not re-timed)"
                                                  if "not_retimed" in row else ")"), row)
                 for name, row in shipped.items() if "refused" not in row]
        if part["best"]:
            best = part["best"]
            how = (f", {best['trial_speedup']:.2f}× in its trial, confirmed by a replay" if best.get("confirmed")
                   else "")
            rows.append((f"**tune best** (trial {best['trial']}: {best['summary']}{how})", {**best, "meets": True}))
        if part.get("replay"):
            rows.append(("tune best, replayed again with `convert`", part["replay"]))
        for label, row in rows:
            first = row.get("first_speedup", row.get("trial_speedup"))
            lines.append(f"| {label} | {row['speedup']:.2f}× | {f'{first:.2f}×' if first else ''} | "
                         f"{row['drop']:.2f} | {100 * row['agreement']:.1f} % | {'✓' if row['meets'] else '✗'} |")
        lines.append("")
        refused = {name: row["refused"] for name, row in shipped.items() if "refused" in row}
        if refused:
            lines += ["Refused on vit_fmnist196: " + "; ".join(f"{name} ({why})" for name, why in refused.items()),
                      ""]
        not_run = study.get("shipped", {}).get("not_run", {})
        if not_run:
            lines += ["Not run in this round (their fine-tune steps): "
                      + ", ".join(f"{name} ({steps})" for name, steps in not_run.items()) + ".", ""]
        within = [(row["speedup"], label) for label, row in rows
                  if row["meets"] and not label.startswith(("**tune", "tune", "ORT"))]
        if within and part.get("replay"):
            bar, label = max(within)
            lines += [f"The fastest shipped recipe within {part['max_drop']:g} pt: {label} at {bar:.2f}×; tune's best, "
                      f"replayed: {part['replay']['speedup'] / bar:.2f}× of it (the issue's target: ≥ 1.2×).", ""]
    part = study.get("deit_s")
    if part:
        lines += [f"Measured {part['date']} on {part['machine']}; commit {short_commit(part.get('commit'))}. "
                  f"`vitcompress tune deit_s --random-init --data synthetic --objective latency --trials "
                  f"{part['trials']}`: {part['wall_s'] / 60:.0f} min, {part['per_trial_s']:.0f} s per trial; every "
                  "front recipe replayed with `convert`.", "",
                  "| front recipe | what it does | speed-up in tune | replayed | replay / tune | disagreement (pt) |",
                  "|---|---|---:|---:|---:|---:|"]
        for row in part["front"]:
            lines.append(f"| {row['file']} | {row['summary']} | {row['speedup']:.2f}× | {row['replay']['speedup']:.2f}× "
                         f"| {row['replay_ratio']:.2f} | {row['drop']:.1f} |")
    return "\n".join(lines) + "\n"


def report_overhead_table(result: dict) -> str:
    """bench/report_overhead.json: what the accuracy ladder and report.html add to make demo's conversion."""
    parts = result["seconds"]
    return "\n".join([
        f"Measured {result['date']} on {result['machine']}; onnxruntime {result['threads']} intra-op threads; commit "
        f"{short_commit(result.get('commit'))}; load average {result['load_average_1min']:.1f} (1 min) at the end. "
        f"{result['conversion']}: {result['validation_images']} validation images, ladder on "
        f"{result['ladder_images']}.", "",
        "| part | seconds |", "|---|---:|",
        f"| the conversion without the ladder and the page | {result['without_s']:.1f} |",
        *(f"| `{name}` ({what}) | {parts[name]:.2f} |" for name, what in (
            ("ladder", "the five rungs, the transformed one before fine-tuning"),
            ("end-to-end", "end-to-end latency, predictions.npz, thumbnails"), ("page", "report.html"))),
        f"| **added** | **{result['ladder_and_page_s']:.1f} ({result['overhead'] * 100:.1f} %)** |", "",
        f"report.html: {result['report_html_bytes'] / 1e6:.2f} MB."]) + "\n"


def convert_walltime_table(result: dict) -> str:
    """bench/convert_walltime.json: a DeiT-S svd conversion's wall time, stage by stage (the report's timings)."""
    steps = "; ".join((f"step {s['step']} `{s['transform']}` ({s['modules']} modules) {s['seconds']:.1f} s, of "
                       f"which calibration {s['calibration_seconds']:.1f} s") for s in result["steps"])
    lines = [
        (f"Measured {result['date']} on {result['machine']} ({result['cpus']} CPUs, torch {result['torch_threads']} "
         f"threads, onnxruntime {result['onnxruntime_threads']} intra-op threads); commit "
         f"{short_commit(result.get('commit'))}; machine load before: `{result['uptime_before']}`, after: "
         f"`{result['uptime_after']}`. `{result['conversion']}`: {result['calibration_images']} calibration images, "
         f"{result['validation_images']} validation images, {result['latency_runs']} latency runs, "
         f"{result['profile_runs']} profiled runs, ladder on {result['ladder_images']}."), "",
        (f"**{result['wall_s']:.1f} s** wall ({'within' if result['wall_s'] <= result['target_s'] else 'over'} the "
         f"{result['target_s']:.0f} s target); {result['stages_s']:.1f} s in the stages. {steps}."), "",
        "| stage | seconds | share | parts (seconds) |", "|---|---:|---:|---|"]
    for stage in result["stages"]:
        parts = ", ".join(f"{part['name']} {part['seconds']:.1f}" for part in stage["parts"])
        lines.append(f"| {stage['stage']} | {stage['seconds']:.1f} | {100 * stage['seconds'] / result['stages_s']:.0f} % "
                     f"| {parts} |")
    return "\n".join(lines) + "\n"


def _jsonl(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / "bench" / name).read_text().splitlines() if line.strip()]


# name → (results file, for messages; renderer of (root, page))
BLOCKS: dict[str, tuple[str, Callable[[Path, Path], str]]] = {
    "headline": ("bench/results/*.json", _headline),
    "bench": ("bench/results/*.json", _bench),
    "gates": ("bench/results/*.json", _gates),
    "skip_study": ("bench/skip_study.json", lambda root, page: skip_study_tables(_json(root, "skip_study.json"))),
    "token_count": ("bench/token_count.json", lambda root, page: token_count_table(_json(root, "token_count.json"))),
    "quant_latency": ("bench/quant_study.json",
                      lambda root, page: quant_latency_table(_json(root, "quant_study.json"))),
    "quant_calibration": ("bench/quant_study.json",
                          lambda root, page: quant_calibration_table(_json(root, "quant_study.json"))),
    "shiftadd_study": ("bench/shiftadd_study.json",
                       lambda root, page: shiftadd_study_table(_json(root, "shiftadd_study.json"))),
    "shiftadd_blocks": ("bench/shiftadd_blocks.json",
                        lambda root, page: shiftadd_blocks_table(_json(root, "shiftadd_blocks.json"))),
    "deploy": ("bench/deploy.json", lambda root, page: deploy_table(_json(root, "deploy.json"))),
    "golden_tolerance": ("bench/golden_tolerance.json",
                         lambda root, page: golden_tolerance_table(_json(root, "golden_tolerance.json"))),
    "tune_study": ("bench/tune_study.json", lambda root, page: tune_study_tables(_json(root, "tune_study.json"))),
    "report_overhead": ("bench/report_overhead.json",
                        lambda root, page: report_overhead_table(_json(root, "report_overhead.json"))),
    "convert_walltime": ("bench/convert_walltime.json",
                         lambda root, page: convert_walltime_table(_json(root, "convert_walltime.json"))),
    "finetune_throughput": ("bench/finetune_throughput.jsonl",
                            lambda root, page: finetune_throughput_table(_jsonl(root, "finetune_throughput.jsonl"))),
}


# ----------------------------------------------------------------------------------------------- the pages

def relative(target: Path, page: Path) -> str:
    """``target`` as a markdown link from ``page`` (both absolute)."""
    return Path(os.path.relpath(target, page.parent)).as_posix()


def pages(root: Path) -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render(name: str, root: Path, page: Path) -> str:
    """Block ``name`` as it belongs on ``page``, from the results files under ``root``."""
    return BLOCKS[name][1](root, page)


def _rewrite(root: Path, page: Path, text: str, problems: list[str]) -> str:
    rel = page.relative_to(root).as_posix()

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            problems.append(f"{rel}: block '{name}' is not one bench/pages.py renders")
            return match.group(0)
        try:
            body = render(name, root, page)
        except (OSError, KeyError, ValueError, StopIteration) as exc:
            problems.append(f"{rel}: block '{name}' cannot be rendered from {BLOCKS[name][0]}: {exc!r}")
            return match.group(0)
        if body != match.group(2):
            problems.append(f"{rel}: block '{name}' disagrees with {BLOCKS[name][0]}")
        return f"<!-- {name}:start -->\n{body}<!-- {name}:end -->"

    return BLOCK.sub(fill, text)


def check(root: Path = ROOT) -> list[str]:
    """Every disagreement between a page under ``root`` and the results files under ``root``, one line each
    (``page: block 'NAME' disagrees with FILE``), plus every block no page holds; empty when all agree."""
    problems: list[str] = []
    seen: set[str] = set()
    for page in pages(root):
        text = page.read_text()
        seen.update(match.group(1) for match in BLOCK.finditer(text))
        _rewrite(root, page, text, problems)
    problems += [f"block '{name}' ({BLOCKS[name][0]}) is on no page" for name in BLOCKS if name not in seen]
    return problems


def write(root: Path = ROOT) -> list[str]:
    """Rewrite every block of every page under ``root``; returns the pages changed (and prints any block that
    could not be rendered)."""
    changed = []
    for page in pages(root):
        problems: list[str] = []
        text = page.read_text()
        new = _rewrite(root, page, text, problems)
        for problem in problems:
            if "disagrees" not in problem:
                print(f"pages: {problem}", file=sys.stderr)
        if new != text:
            page.write_text(new)
            changed.append(page.relative_to(root).as_posix())
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page disagrees")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args()
    if args.check:
        problems = check(args.root)
        for problem in problems:
            print(problem)
        sys.exit(1 if problems else 0)
    for page in write(args.root):
        print(f"pages: rewrote {page}")


if __name__ == "__main__":
    main()
