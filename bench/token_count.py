"""Where the token count matters (issue 17, part 5): token merging, Taylor attention and attention skipping on
``vit_fmnist`` (49 patch tokens + class token) and ``vit_fmnist196`` (196 + 1, a ViT-224's count), the same
DeiT-Tiny widths and the same Fashion-MNIST test images, through the real pipeline (``convert``).

Each variant is one shipped recipe with overrides, run on both models with the same fine-tune budget; the rows
hold top-1, agreement and the onnxruntime b1 / b8 latency of the converted model against its own original
(interleaved, 2 threads). Writes ``bench/token_count.json``, then has ``bench/pages.py`` (the table's one renderer)
rewrite the pages' ``token_count`` block.

    python bench/token_count.py --images 2000 --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import pages
from run import summarise

from vitcompress.api import convert, machine_description

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("vit_fmnist", "vit_fmnist196")
NO_GATES = ["validate.max_top1_drop=null", "validate.min_agreement=null", "validate.max_abs_diff=1.0"]


def variants(steps: int) -> list[tuple[str, str, list[str]]]:
    """(label, recipe, overrides): ToMe at three merge rates (training-free), Taylor attention and the two
    attention skips of ``skip.yaml`` each without and with ``steps`` distillation steps (bf16 autocast for the
    skips; Taylor attention at ``taylor.yaml``'s own ``precision: auto``)."""
    tuned = [f"finetune.steps={steps}"]
    return [("ToMe r=3 (tome.yaml)", "tome", []),
            ("ToMe r=8", "tome", ["steps.0.r=8"]),
            ("ToMe r=13 (ToMe's DeiT-S setting)", "tome", ["steps.0.r=13"]),
            ("Taylor attention, no fine-tune", "taylor", ["finetune=null"]),
            (f"Taylor attention, {steps} fine-tune steps", "taylor", tuned),
            ("skip blocks 2, 4, no fine-tune", "skip", ["finetune=null"]),
            (f"skip blocks 2, 4, {steps} fine-tune steps (bf16)", "skip", [*tuned, "finetune.precision=bf16"])]


markdown = pages.token_count_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="first N Fashion-MNIST test images")
    parser.add_argument("--steps", type=int, default=50, help="fine-tune steps of the tuned variants")
    parser.add_argument("--runs", type=int, default=10, help="interleaved latency runs per batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "token_count.json")
    args = parser.parse_args()
    work = args.out.parent / "token_count_runs"
    common = [*NO_GATES, f"validate.images={args.images}", f"validate.latency_runs={args.runs}",
              "validate.profile_runs=0"]
    commit = pages.source_commit(ROOT)  # before this run rewrites its results file
    rows = []
    for label, recipe, overrides in variants(args.steps):
        for model in MODELS:
            print(f"token count: {model} / {label}", file=sys.stderr, flush=True)
            report = convert(model, ROOT / "recipes" / f"{recipe}.yaml", out_dir=work, force=True,
                             overrides=[*common, *overrides]).report
            rows.append(summarise(label, model, report))
    shutil.rmtree(work, ignore_errors=True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine_description(), "commit": commit,
               "images": args.images,
               "steps": args.steps, "runs": args.runs, "rows": rows}
    args.out.write_text(json.dumps(results, indent=2))
    if args.out.resolve() == (ROOT / "bench" / "token_count.json").resolve():
        pages.write(ROOT)
    print(markdown(results))


if __name__ == "__main__":
    main()
