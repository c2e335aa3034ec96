"""Where binary-code attention is cheap: ``vit_fmnist`` top-1 with ``shiftadd_attention`` in one block at a time,
no fine-tune, beside the original on the same test images (torch, eval mode). This is the measurement behind the
blocks recipes/shiftadd.yaml converts; the paper converts the first blocks, which cost the most here.

    python bench/shiftadd_blocks.py [--images 2000] [--out bench/shiftadd_blocks.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from pathlib import Path

import torch

from vitcompress.api import apply, machine_description
from vitcompress.data import fmnist_dataset
from vitcompress.layers.binary_attention import BinaryAttention
from vitcompress.models import load_model
from vitcompress.transforms.shiftadd_attention import BinaryAttentionConfig


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(-1) for batch in images.split(250)])
    return 100.0 * (predicted == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "shiftadd_blocks.json")
    args = parser.parse_args()
    images, labels = fmnist_dataset("test", args.images).tensors
    original = load_model("vit_fmnist").model.eval()
    depth = len(original.blocks)
    result = {"date": datetime.date.today().isoformat(), "machine": machine_description(), "images": len(labels),
              "original": top1(original, images, labels), "binary_attention_in_block": {}}
    for block in range(depth):
        model = apply(copy.deepcopy(original), BinaryAttentionConfig(targets=[f"blocks.{block}.attn"]))
        assert isinstance(model.blocks[block].attn, BinaryAttention)
        result["binary_attention_in_block"][block] = top1(model, images, labels)
        print(f"block {block}: {result['binary_attention_in_block'][block]:.2f} % "
              f"(original {result['original']:.2f} %)", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
