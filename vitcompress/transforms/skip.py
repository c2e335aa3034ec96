"""``attention_skip``: remove the attention branch of chosen transformer blocks (PIVOT, DAC 2024).

Which blocks, among the target blocks (default every ``blocks.N``, minus ``ignore``):

* ``blocks: [j, …]``: explicitly, by index in ``model.blocks``;
* ``select: cka`` with ``count: k``: greedily, k rounds. Each round scores every remaining block j by
  linear CKA between its input (the output of block j−1) and its attention-branch output on the
  calibration images, and skips the highest-scoring one (attention that says what the residual stream
  already says is redundant); the next round re-scores on the partially skipped model;
* ``select: cka`` with ``latency_budget_ms``: the same greedy order, one block at a time, until the model's
  measured onnxruntime latency (``latency_batch``, ``latency_threads``, median of ``latency_runs``) is
  within the budget.

The CKA scores of every round go to the report (``details``). PIVOT's released code has no path-score or
search code; this follows docs/transforms/attention_skip.md.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from vitcompress.errors import TargetError
from vitcompress.transforms.registry import TransformConfig, TransformInputs, register
from vitcompress.transforms.select import replace_module, select_modules

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)
STEP = "attention_skip"


class SkipConfig(TransformConfig):
    transform: Literal["attention_skip"] = "attention_skip"
    targets: list[str] = Field(default_factory=lambda: ["blocks.*"], min_length=1,
                               description="candidate blocks (selectors); default every block")
    blocks: Optional[list[int]] = Field(None, description="indices in model.blocks whose attention is removed")
    select: Optional[Literal["cka"]] = Field(None, description="cka: choose blocks greedily by linear CKA")
    count: Optional[int] = Field(None, ge=1, description="with select: how many blocks to skip")
    latency_budget_ms: Optional[float] = Field(None, gt=0, description="with select: skip until ORT latency ≤ this")
    latency_batch: int = Field(1, ge=1, le=1024, description="batch size at which the budget is measured")
    latency_threads: int = Field(2, ge=1, le=256, description="ORT intra-op threads for the budget")
    latency_runs: int = Field(20, ge=3, le=10_000, description="timed runs (median) per budget check")

    @model_validator(mode="after")
    def _one_rule(self) -> "SkipConfig":
        if (self.blocks is None) == (self.select is None):
            raise ValueError("give exactly one of blocks, select")
        if self.blocks is not None:
            if self.count is not None or self.latency_budget_ms is not None:
                raise ValueError("count and latency_budget_ms go with select: cka, not with blocks")
            if any(b < 0 for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
                raise ValueError(f"blocks must be distinct indices ≥ 0 (got {self.blocks})")
        elif (self.count is None) == (self.latency_budget_ms is None):
            raise ValueError("select: cka needs exactly one of count, latency_budget_ms")
        return self


def cka_scores(model: nn.Module, candidates: list[tuple[str, nn.Module]], batches) -> dict[str, float]:
    """Per candidate block: linear CKA(block input, attention-branch output) over all calibration tokens."""
    from vitcompress.cka import CKAStats
    from vitcompress.hooks import run_with_hooks

    stats = {name: CKAStats() for name, _ in candidates}
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, block in candidates:
        hooks.append(block.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0])))
        hooks.append(block.ls1.register_forward_hook(
            lambda _m, _a, out, name=name: stats[name].update(inputs.pop(name), out)))
    was_training = model.training
    model.eval()
    try:
        run_with_hooks(model, batches, hooks)
    finally:
        model.train(was_training)
    if any(s.n == 0 for s in stats.values()):
        raise TargetError(f"{STEP}: no calibration images reached the blocks")
    return {name: s.value() for name, s in stats.items()}


def onnx_latency_ms(model: nn.Module, input_size: tuple[int, ...], config: SkipConfig) -> float:
    """Median onnxruntime latency (ms) of ``model`` exported to a temporary ONNX file."""
    from vitcompress.deploy.runtime import measure_latency
    from vitcompress.deploy.timing_lock import latency_lock
    from vitcompress.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="vitcompress-skip-") as tmp:
        path = export_onnx(model, Path(tmp) / "candidate.onnx", input_size=input_size)
        with latency_lock(f"{STEP} latency budget"):
            timing = measure_latency({"candidate": path}, batch_sizes=[config.latency_batch],
                                     threads=config.latency_threads, runs=config.latency_runs, warmup=3)
    return timing["candidate"][config.latency_batch]["p50_ms"]


def _greedy(model: nn.Module, config: SkipConfig, inputs: TransformInputs, names: list[str]) -> list[dict]:
    """The CKA rounds, run on a copy of ``model`` so that a failed search leaves the model untouched."""
    from vitcompress.layers.skip import SkippedBlock

    work = copy.deepcopy(model)
    candidates = {name: work.get_submodule(name) for name in names}
    rounds: list[dict] = []
    input_size = None
    if config.latency_budget_ms is not None:
        input_size = tuple(next(iter(inputs.calibration_batches())).shape[1:])
        rounds.append({"chosen": None, "latency_ms": onnx_latency_ms(work, input_size, config)})
    while candidates:
        if config.count is not None and len(rounds) == config.count:
            break
        if input_size is not None and rounds[-1]["latency_ms"] <= config.latency_budget_ms:
            break
        scores = cka_scores(work, list(candidates.items()), inputs.calibration_batches())
        best = max(scores, key=scores.get)
        replace_module(work, best, SkippedBlock.from_block(candidates.pop(best)))
        record = {"chosen": best, "cka": scores}
        if input_size is not None:
            record["latency_ms"] = onnx_latency_ms(work, input_size, config)
        rounds.append(record)
        log.info("%s: round %d: %s (CKA %.4f)", STEP, len(rounds), best, scores[best])
    if input_size is not None and rounds[-1]["latency_ms"] > config.latency_budget_ms:
        raise TargetError(f"{STEP}: latency budget {config.latency_budget_ms:g} ms not met even with every target "
                          f"block skipped ({rounds[-1]['latency_ms']:.2f} ms at batch {config.latency_batch})")
    return rounds


@register(SkipConfig)
def apply_skip(model: nn.Module, config: SkipConfig, inputs: TransformInputs) -> list[str]:
    """Remove the attention branch of chosen blocks, keeping their MLP (PIVOT, DAC'24): `blocks: [..]`, or
    `select: cka` with `count` (greedy by linear CKA between a block's input and its attention output,
    re-scored after each choice) or with `latency_budget_ms` (skip until the measured ORT latency fits)."""
    from timm.models.vision_transformer import Block

    from vitcompress.layers.skip import SkippedBlock

    candidates = dict(select_modules(model, config.targets, config.ignore, (Block,), STEP))
    if config.blocks is not None:
        chosen = [f"blocks.{j}" for j in config.blocks]
        outside = [name for name in chosen if name not in candidates]
        if outside:
            raise TargetError(f"{STEP}: {outside[0]} is not among the target blocks ({', '.join(candidates)})")
    else:
        if config.count is not None and config.count > len(candidates):
            raise TargetError(f"{STEP}: count {config.count} exceeds the {len(candidates)} target blocks")
        rounds = _greedy(model, config, inputs, list(candidates))
        chosen = [r["chosen"] for r in rounds if r["chosen"] is not None]
        inputs.details.update(select="cka", rounds=rounds)
    for name in chosen:
        replace_module(model, name, SkippedBlock.from_block(candidates[name]))
        log.info("%s: %s → attention removed", STEP, name)
    inputs.details["skipped"] = chosen
    return chosen
