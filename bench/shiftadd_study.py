"""How recipes/shiftadd.yaml was chosen: onnxruntime latency of ShiftAddViT variants on DeiT-S (random weights,
224 px, 197 tokens) beside the fp32 original and ORT's dynamic int8 of it, all timed interleaved in one process.

    python bench/shiftadd_study.py [--runs 20] [--threads 2] [--variants a,b] [--out bench/shiftadd_study.json]

Each variant is applied with the real transforms (``vitcompress.api.apply``) and exported with the real export;
MoE layers are exported with the router forced to send ``--shift-share`` of the tokens to the shift expert
(random weights give no trained router). Prints a markdown table of p50 ratios (original fp32 / variant and
ORT-int8 original / variant) with the spread, and writes the raw timings as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from ort_int8 import quantized

from vitcompress.api import apply, machine_description
from vitcompress.deploy.runtime import measure_latency
from vitcompress.export import export_onnx
from vitcompress.layers.moe_linear import MoELinear
from vitcompress.models import load_model
from vitcompress.recipe import parse_recipe

ATTN_LINEARS = "re:blocks\\.\\d+\\.attn\\.(qkv|proj)"
FC1, FC2 = "re:blocks\\.\\d+\\.mlp\\.fc1", "re:blocks\\.\\d+\\.mlp\\.fc2"
ALL_LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.fc[12])"


LATE = ("blocks.10.attn", "blocks.11.attn")
TUNED_MOE = ("blocks.10.mlp.fc1", "blocks.11.mlp.fc1")


def shift(*targets: str, ignore: tuple[str, ...] = ()) -> dict:
    return {"transform": "shift_linear", "targets": list(targets), "ignore": list(ignore), "levels": 7, "int8": True}


def binary(*targets: str) -> dict:
    return {"transform": "shiftadd_attention", "targets": list(targets)}


def moe(*targets: str, dispatch: str = "gather") -> dict:
    return {"transform": "shiftadd_moe", "targets": list(targets), "levels": 7, "int8": True,
            "latency_weights": [0.5, 0.5], "dispatch": dispatch}


VARIANTS = {
    "paper": [binary("blocks.*.attn"), moe(FC1, FC2, dispatch="where")],
    "shift_mlp": [shift(FC1, FC2)],
    "shift_all": [shift(ALL_LINEARS)],
    "shift_all + binary all": [binary("blocks.*.attn"), shift(ALL_LINEARS)],
    "shift_all + binary 0-5": [binary("re:blocks\\.[0-5]\\.attn"), shift(ALL_LINEARS)],
    "shift_all but fc1 MoE gather": [shift(ATTN_LINEARS, FC2), moe(FC1)],
    "shift_all but fc1 MoE where": [shift(ATTN_LINEARS, FC2), moe(FC1, dispatch="where")],
    "binary all + shift_all but fc1 MoE gather": [binary("blocks.*.attn"), shift(ATTN_LINEARS, FC2), moe(FC1)],
    "shift_all but fc1 of blocks 9-11 MoE gather": [shift(ATTN_LINEARS, FC2, "re:blocks\\.[0-8]\\.mlp\\.fc1"),
                                                    moe("re:blocks\\.(9|10|11)\\.mlp\\.fc1")],
    "shift_all but fc1 of blocks 9-11 MoE where": [shift(ATTN_LINEARS, FC2, "re:blocks\\.[0-8]\\.mlp\\.fc1"),
                                                   moe("re:blocks\\.(9|10|11)\\.mlp\\.fc1", dispatch="where")],
    "shift_all + binary 10-11": [binary(*LATE), shift(ALL_LINEARS)],
    "binary 10-11 + MoE gather fc1 of 10-11": [binary(*LATE), shift(ALL_LINEARS, ignore=TUNED_MOE),
                                               moe(*TUNED_MOE)],
    "shiftadd.yaml: binary 10-11 + MoE gather fc1 of 11": [binary(*LATE), shift(ALL_LINEARS, ignore=TUNED_MOE[1:]),
                                                           moe(*TUNED_MOE[1:])],
}


def force_share(model: torch.nn.Module, shift_share: float) -> None:
    """Make every MoE router send about ``shift_share`` of the tokens to the shift expert (random weights give
    no trained router): small random router weights, so the logit difference is about N(0, 2) on unit-scale
    tokens, and a bias offset at that distribution's ``shift_share`` quantile."""
    for module in model.modules():
        if isinstance(module, MoELinear):
            with torch.no_grad():
                module.router.weight.normal_(0, 1.0 / module.in_features ** 0.5)
                offset = torch.distributions.Normal(0, 2 ** 0.5).icdf(torch.tensor(shift_share)).item()
                module.router.bias.copy_(torch.tensor([0.0, offset]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_s")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shift-share", type=float, default=0.8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "shiftadd_study.json")
    args = parser.parse_args()
    from pages import shiftadd_study_table, source_commit
    commit = source_commit()  # before this run rewrites its results file
    chosen = [name.strip() for name in args.variants.split(",")]
    original = load_model(args.model, random_init=True)
    size = tuple(original.data_config["input_size"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(original.model, work / "original.onnx", input_size=size)
        paths = {"original": fp32, "original + ORT int8": quantized(fp32, work / "original_int8.onnx")}
        for i, name in enumerate(chosen):
            model = copy.deepcopy(original.model).eval()
            apply(model, parse_recipe({"steps": VARIANTS[name]}, name))
            force_share(model, args.shift_share)
            paths[name] = export_onnx(model, work / f"variant{i}.onnx", input_size=size)
            print(f"exported {name}", flush=True)
        start = time.perf_counter()
        timing = {name: {f"b{batch}": t for batch, t in per_batch.items()}  # the results file's "b8" keys
                  for name, per_batch in measure_latency(paths, batch_sizes=[1, 8], threads=args.threads,
                                                         runs=args.runs, warmup=3).items()}
        seconds = time.perf_counter() - start
    results = {"model": args.model, "machine": machine_description(), "threads": args.threads, "runs": args.runs,
               "shift_share": args.shift_share, "date": time.strftime("%Y-%m-%d"), "commit": commit,
               "latency": timing}
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{seconds:.0f} s of interleaved runs\n\n{shiftadd_study_table(results)}")


if __name__ == "__main__":
    main()
