"""A third-party transform, ``magnitude_prune``, defined and registered outside vitcompress.

Importing this module registers the transform: a config class (its ``transform: Literal[...]`` field names it
in recipes) and the function that converts the modules it selects, decorated with ``@register(Config)``.
``examples/custom_transform.yaml`` loads it with ``plugins: [custom_transform]`` (a module name is looked up
in the recipe's folder first), so ``vitcompress convert`` and ``vitcompress batch`` validate and run it like a
built-in transform. The pruned layers stay plain ``nn.Linear``s with zeros in them: onnxruntime runs them as
any Linear (the zeros cost as much as any weight on a dense kernel: this shows the mechanism, not a speed-up).

Run as a script, it applies the transform from Python, then runs the recipe through both commands on a
two-block random-init copy of ``vit_fmnist`` with synthetic data (about a minute on 2 CPU cores); each
``--set`` is passed on to both commands::

    python examples/custom_transform.py [OUT_DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vitcompress.transforms.registry import MLP_LINEARS, TransformConfig, TransformInputs, default_targets, register
from vitcompress.transforms.select import select_modules

HERE = Path(__file__).resolve().parent


class MagnitudePruneConfig(TransformConfig):
    """Zero the smallest-magnitude weights of each target Linear."""

    transform: Literal["magnitude_prune"] = "magnitude_prune"
    targets: list[str] = default_targets(MLP_LINEARS, "both MLP Linears of every block")
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of each Linear's weights set to zero")


@register(MagnitudePruneConfig)
def magnitude_prune(model: nn.Module, config: MagnitudePruneConfig, inputs: TransformInputs) -> list[str]:
    """Set the `sparsity` fraction of smallest |w| of each target Linear to zero (unstructured magnitude
    pruning); the layers stay nn.Linear."""
    targets = select_modules(model, config.targets, config.ignore, (nn.Linear,), config.transform)
    with torch.no_grad():
        for _, linear in targets:
            count = int(config.sparsity * linear.weight.numel())
            if count:
                threshold = linear.weight.abs().flatten().kthvalue(count).values
                linear.weight.masked_fill_(linear.weight.abs() <= threshold, 0.0)
    return [name for name, _ in targets]


#: convert's options for a model small enough for a demo: two random-init blocks, synthetic images.
TINY = ["--random-init", "--model-arg", "depth=2", "--data", "synthetic"]


def main(out_dir: Path, overrides: list[str]) -> None:
    import vitcompress

    model = vitcompress.load_model("vit_fmnist", random_init=True, model_args={"depth": 2}).model
    pruned = vitcompress.apply_recipe(model, [MagnitudePruneConfig(sparsity=0.75)])[0]
    zeros = sum(int((model.get_submodule(name).weight == 0).sum()) for name in pruned)
    print(f"apply: {len(pruned)} Linears pruned, {zeros:,} weights set to zero")

    sets = [arg for item in overrides for arg in ("--set", item)]
    convert = [sys.executable, "-m", "vitcompress", "convert", "vit_fmnist", "--recipe",
               str(HERE / "custom_transform.yaml"), "--out", str(out_dir / "convert"), *TINY, *sets]
    subprocess.run(convert, check=True)
    batch = [sys.executable, "-m", "vitcompress", "batch", str(HERE / "custom_transform_batch.yaml"),
             "--out", str(out_dir / "batch"), "--smoke", *sets]
    subprocess.run(batch, check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="magnitude_prune from Python, vitcompress convert and batch")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where the outputs go (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.out_dir is not None:
        main(args.out_dir, args.overrides)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp), args.overrides)
