"""How recipes/fast.yaml was chosen: top-1 (torch, no fine-tune) and MAC-ideal speed-up of combinations of
transforms on vit_fmnist, each applied with the real transforms and 512 calibration images.

    python bench/fast_study.py [--images 2000]

Prints a markdown table (the one in README.md's `recipes/fast.yaml` section).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import DataLoader, Subset

from vitcompress.api import apply_recipe
from vitcompress.data import fmnist_dataset
from vitcompress.measure import count_macs
from vitcompress.models import load_model
from vitcompress.recipe import parse_recipe

MLP, ATTENTION = "re:blocks\\.\\d+\\.mlp\\.fc[12]", "re:blocks\\.\\d+\\.attn\\.(qkv|proj)"


def skips(count: int) -> list[dict]:
    return [{"transform": "attention_skip", "select": "cka", "count": count}]


def low_rank(target: str, ratio: float) -> list[dict]:
    return [{"transform": "svd_lowrank", "targets": [target], "rank_ratio": ratio, "whitening": "cholesky"}]


COMBINATIONS = {
    "MLP 1/8 + attention projections 1/8 (**fast**)": low_rank(MLP, 1 / 8) + low_rank(ATTENTION, 1 / 8),
    "MLP 1/8 + attention projections 1/4": low_rank(MLP, 1 / 8) + low_rank(ATTENTION, 1 / 4),
    "MLP 1/16 + attention projections 1/8": low_rank(MLP, 1 / 16) + low_rank(ATTENTION, 1 / 8),
    "2 CKA attention skips + MLP 1/8 + attention 1/4": skips(2) + low_rank(MLP, 1 / 8) + low_rank(ATTENTION, 1 / 4),
    "4 CKA attention skips + MLP 1/8": skips(4) + low_rank(MLP, 1 / 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="first N Fashion-MNIST test images")
    args = parser.parse_args()
    original = load_model("vit_fmnist")
    train, test = fmnist_dataset("train"), fmnist_dataset("test", args.images)
    size = tuple(original.data_config["input_size"])

    def calibration():
        return (images for images, _ in DataLoader(Subset(train, range(512)), batch_size=128))

    def top1(model: torch.nn.Module) -> float:
        with torch.no_grad():
            hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in DataLoader(test, batch_size=250))
        return hits / len(test) * 100

    macs = count_macs(original.model, size)
    print(f"original top-1 {top1(original.model):.2f} % on the first {len(test)} test images\n")
    print("| combination | top-1 % | MAC-ideal |\n|---|---|---|")
    for name, steps in COMBINATIONS.items():
        model = copy.deepcopy(original.model)
        apply_recipe(model, parse_recipe({"steps": steps, "calibration": {"images": 512}}, name), calibration)
        model.eval()
        print(f"| {name} | {top1(model):.2f} | {macs / count_macs(model, size):.2f}× |", flush=True)


if __name__ == "__main__":
    main()
