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

from torch import nn

from vitcompress.api import apply, machine_description
from vitcompress.data import fmnist_dataset
from vitcompress.evaluate import top1, torch_logits
from vitcompress.layers.binary_attention import BinaryAttention
from vitcompress.models import load_model
from vitcompress.transforms.shiftadd_attention import BinaryAttentionConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "shiftadd_blocks.json")
    args = parser.parse_args()
    from pages import source_commit
    commit = source_commit()  # before this run rewrites its results file
    test = fmnist_dataset("test", args.images)
    labels = test.tensors[1].numpy()

    def accuracy(model: nn.Module) -> float:
        return top1(torch_logits(model, test, len(test)).argmax(-1), labels)

    original = load_model("vit_fmnist").model.eval()
    depth = len(original.blocks)
    result = {"date": datetime.date.today().isoformat(), "machine": machine_description(), "commit": commit,
              "images": len(labels),
              "original": accuracy(original), "binary_attention_in_block": {}}
    for block in range(depth):
        model = apply(copy.deepcopy(original), BinaryAttentionConfig(targets=[f"blocks.{block}.attn"]))
        assert isinstance(model.blocks[block].attn, BinaryAttention)
        result["binary_attention_in_block"][block] = accuracy(model)
        print(f"block {block}: {result['binary_attention_in_block'][block]:.2f} % "
              f"(original {result['original']:.2f} %)", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
