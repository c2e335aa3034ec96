"""Sensitivity first: the probe recipe ``tune`` maps with :func:`vitcompress.sensitivity_map.sensitivity`, and the
first trials it enqueues from that map.

The probe has one step per searched kind of change (SVD of the MLP Linears and of the attention Linears at the
middle rank ratio of the space, Taylor attention, shift MLP weights), so each cell of the map is the
training-free cost and measured gain of one space choice on one block group. The seeds are greedy fills of the
accuracy budget: cells sorted by speed-up gained per point lost, taken while their summed cost stays within
half, one and two budgets; then, when the space quantizes, the half- and one-budget fills exported with each
int8 quantization (int8 composes with the structural steps: what they remove and what int8 speeds up differ,
and without these seeds the sampler met the combination only by chance: none in the first 30-trial study), and
last the plain int8 export (dynamic) of the original, the one-call onnxruntime baseline.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from vitcompress.recipe import Recipe
from vitcompress.search.space import Choice, GroupChoice, ResolvedSpace
from vitcompress.search.trial import drop_of
from vitcompress.sensitivity_map import AppliedCell, Sensitivity

#: Probe step name (in the sensitivity map's steps, in this order) → what it sets in a group.
PROBES = ("svd_mlp", "svd_attention", "taylor", "shift_mlp")
BUDGET_SHARES = (0.5, 1.0, 2.0)
INT8 = ("dynamic", "static")


def probe_steps(space: ResolvedSpace) -> list[tuple[str, dict[str, Any]]]:
    """The probe recipe's steps for ``space`` (only the kinds it searches), each with its probe name."""
    steps: list[tuple[str, dict[str, Any]]] = []
    middle = sorted(space.rank_ratios)[len(space.rank_ratios) // 2] if space.rank_ratios else None
    mlp = [f"blocks.*.mlp.{n}" for n in ("fc1", "fc2") if n in space.svd_linears]
    attention = [f"blocks.*.attn.{n}" for n in ("qkv", "proj") if n in space.svd_linears]
    if middle is not None and mlp:
        steps.append(("svd_mlp", {"transform": "svd_lowrank", "targets": mlp, "rank_ratio": middle,
                                  "whitening": space.whitening}))
    if middle is not None and attention:
        steps.append(("svd_attention", {"transform": "svd_lowrank", "targets": attention, "rank_ratio": middle,
                                        "whitening": space.whitening}))
    if space.taylor:
        steps.append(("taylor", {"transform": "taylor_attention"}))
    if space.shift_mlp:
        steps.append(("shift_mlp", {"transform": "shift_linear"}))
    return steps


def probe_recipe(space: ResolvedSpace, base: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe ``tune`` maps, and the probe name of each of its steps."""
    from vitcompress.recipe import parse_recipe

    steps = probe_steps(space)
    data = base.model_dump(mode="json", by_alias=True)
    data["steps"] = [step for _, step in steps]
    data["finetune"] = None
    return parse_recipe(data, "tune probe"), [name for name, _ in steps]




def seed_choices(sensitivity: Sensitivity, probes: list[str], space: ResolvedSpace,
                 max_drop: Optional[float]) -> list[Choice]:
    """The seed trials: greedy fills of ``BUDGET_SHARES`` of ``max_drop`` (None: a latency-only search, which
    fills 1, 2 and 4 points of disagreement) from the cells that gained speed, the half- and one-budget fills with
    each int8 export of the space, and dynamic int8 alone."""
    middle = sorted(space.rank_ratios)[len(space.rank_ratios) // 2] if space.rank_ratios else None
    cells = [(probes[step.step], cell) for step in sensitivity.steps for cell in step.cells
             if isinstance(cell, AppliedCell) and cell.speedup > 1.0 and cell.group < len(space.groups)]

    def cost(cell: AppliedCell) -> float:
        """Points the cell loses, as a trial counts them (:func:`~vitcompress.search.trial.drop_of`)."""
        return max(drop_of(cell.top1, sensitivity.original_top1, cell.agreement), 0.0)

    cells.sort(key=lambda pc: -math.log(pc[1].speedup) / max(cost(pc[1]), 0.05))
    budget = max_drop if max_drop is not None else 2.0
    fills: list[tuple[float, Choice]] = []
    for share in BUDGET_SHARES:
        groups = [dict(ranks={}, taylor=False, shift_mlp=False) for _ in space.groups]
        spent = 0.0
        for probe, cell in cells:
            group = groups[cell.group]
            if spent + cost(cell) > share * budget:
                continue
            if probe == "svd_mlp" and not group["shift_mlp"]:
                group["ranks"].update({n: middle for n in ("fc1", "fc2") if n in space.svd_linears})
            elif probe == "svd_attention":
                group["ranks"].update({n: middle for n in ("qkv", "proj") if n in space.svd_linears})
            elif probe == "taylor":
                group["taylor"] = True
            elif probe == "shift_mlp" and not any(n in group["ranks"] for n in ("fc1", "fc2")):
                group["shift_mlp"] = True
            else:
                continue
            spent += cost(cell)
        choice = Choice(groups=[GroupChoice(**g) for g in groups])
        if choice not in (c for _, c in fills) and choice.summary() != "no change":
            fills.append((share, choice))
    seeds = [choice for _, choice in fills]
    seeds += [choice.model_copy(update={"quantize": mode}) for share, choice in fills if share <= 1.0
              for mode in INT8 if mode in space.quantize]
    if "dynamic" in space.quantize:
        seeds.append(Choice(groups=[GroupChoice() for _ in space.groups], quantize="dynamic"))
    return seeds
