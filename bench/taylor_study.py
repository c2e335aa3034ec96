"""Taylor attention on ``vit_fmnist``: top-1 without and after the distillation fine-tune, per key centring and
with / without the paper's training-only sparse branch (issue 3's accuracy measurements).

Each run converts every block's attention of the embedded model, fine-tunes with the real fine-tune stage
(on a GPU when there is one) and measures top-1 in torch on the Fashion-MNIST test split. One JSON line per run
on stdout; ``bench/taylor_study.jsonl`` holds the committed results (see README for machine and date).

    python bench/taylor_study.py > bench/taylor_study.jsonl
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from vitcompress.api import apply_recipe
from vitcompress.context import ConvertSettings, LogProgress, RunContext
from vitcompress.data import DataBundle, fmnist_dataset
from vitcompress.models import load_model
from vitcompress.pipeline import finetune
from vitcompress.recipe import parse_recipe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_BLOCKS = {"targets": ["blocks.*.attn"]}
# (center, sparse branch, fine-tune steps, lr); steps 0 = no fine-tune
RUNS = [("channels", False, 0, 0.0), ("tokens", False, 0, 0.0), ("tokens", True, 200, 1e-4),
        ("tokens", True, 1000, 5e-4), ("tokens", False, 1000, 5e-4), ("tokens", True, 3000, 5e-4)]


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.to(DEVICE).eval()
    with torch.no_grad():
        correct = sum((model(images[i:i + 500].to(DEVICE)).argmax(-1).cpu() == labels[i:i + 500]).sum().item()
                      for i in range(0, len(images), 500))
    model.cpu()
    return 100 * correct / len(images)


def study(center: str, sparse: bool, steps: int, lr: float, original, train, test) -> dict:
    step = {**ALL_BLOCKS, "center": center, "sparse_branch": {"enabled": sparse}}
    tune = {"steps": steps, "lr": lr, "batch_size": 64, "distill": {"logits_kl": 1.0, "labels_ce": 0.5}}
    recipe = parse_recipe({"steps": [{"transform": "taylor_attention", **step}],
                           "finetune": tune if steps else None}, "taylor_study")
    model = copy.deepcopy(original.model)
    apply_recipe(model, recipe)
    result = {"center": center, "sparse_branch": sparse, "finetune_steps": steps, "lr": lr}
    if steps:
        ctx = RunContext(settings=ConvertSettings(model="vit_fmnist", out_dir=Path("unused")), recipe=recipe,
                         work_dir=Path("unused"), scratch_dir=Path("unused"), progress=LogProgress())
        ctx.original, ctx.model = copy.deepcopy(original), model
        ctx.data = DataBundle("fmnist", train, test, True)
        start = time.time()
        finetune(ctx)
        result.update(finetune_seconds=round(time.time() - start, 1), last_loss=ctx.report.finetune.last_loss)
    result["top1"] = top1(model, *test.tensors)
    return result


def main() -> None:
    original = load_model("vit_fmnist")
    train, test = fmnist_dataset("train"), fmnist_dataset("test")
    print(json.dumps({"original_top1": top1(original.model, *test.tensors), "device": DEVICE,
                      "torch": torch.__version__}), flush=True)
    for run in RUNS:
        print(json.dumps(study(*run, original, train, test)), flush=True)


if __name__ == "__main__":
    main()
