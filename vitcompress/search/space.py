"""The search space of ``vitcompress tune``: what a trial may choose, per block group, and the recipe a choice makes.

A :class:`SearchSpace` (the ``--space`` YAML file, validated as strictly as a recipe) lists the choices; a
:class:`ResolvedSpace` fits it to one model (its depth, token count and the transforms its architecture
accepts). Per contiguous block group a trial picks the SVD rank ratio of each attention and MLP Linear (or
none), Taylor attention (ViTALiTy) on the group's attention, and shift weights (ShiftAddViT) on its MLP instead
of SVD; globally, how many attention blocks to skip (PIVOT, CKA-ranked), the token-merging r (ToMe) and its
schedule, and the export quantization. :func:`recipe_for` turns the choice into a complete recipe, applied in
the order skip → Taylor → SVD → shift → token merging (the order every pair of them composes in).

The bounds are the search's **structural fidelity floor**: rank ratios from the list only (default ≥ 1/8),
at most ``attention_skip.max_fraction`` of the blocks skipped (default half), and token merging that keeps at
least ``token_merge.min_tokens_kept`` of the tokens (default a quarter). A latency-only search
(``--objective latency``) cannot leave that floor, so its front stays a set of models, not of deleted networks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vitcompress.errors import RecipeError, TargetError, VitCompressError
from vitcompress.recipe import Recipe, format_validation_error, parse_recipe
from vitcompress.yaml_file import read_yaml_file

LINEARS = ("qkv", "proj", "fc1", "fc2")
LINEAR_MODULE = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
NO_SVD = "none"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenMergeSpace(_Strict):
    """ToMe's r (tokens merged per block) from 0 to ``r_max`` and the schedules to try."""

    r_max: Optional[int] = Field(None, ge=1, description="largest r; default: the r that keeps min_tokens_kept")
    min_tokens_kept: float = Field(0.25, gt=0, le=1, description="structural floor: the share of tokens the last "
                                   "block still sees")
    schedules: list[Literal["constant", "decreasing"]] = Field(
        default_factory=lambda: ["constant", "decreasing"], min_length=1,
        description="constant: r in every block (ToMe's); decreasing: 2r in the first block falling to 0 "
                    "(merge early, where the most redundant tokens are)")


class SkipSpace(_Strict):
    """How many attention blocks to remove (0 … max), chosen by linear CKA (PIVOT)."""

    max_fraction: float = Field(0.5, gt=0, lt=1, description="structural floor: at most this share of the blocks")


class SearchSpace(_Strict):
    """The ``--space`` file. Leaving a transform out (``taylor: false``, ``token_merge: null``, ``rank_ratios: []``)
    removes it from the search."""

    groups: Optional[int] = Field(None, ge=1, le=64, description="contiguous block groups; default min(4, depth)")
    rank_ratios: list[float] = Field(default_factory=lambda: [0.375, 0.25, 0.125],
                                     description="SVD rank ratios to try besides none (below 0.5: a square Linear "
                                                 "at half rank costs what it did); []: no SVD")
    svd_linears: list[Literal["qkv", "proj", "fc1", "fc2"]] = Field(
        default_factory=lambda: list(LINEARS), description="which Linears of a block SVD may factor")
    whitening: Literal["none", "pca", "cholesky"] = "cholesky"
    taylor: bool = Field(True, description="Taylor (linear) attention per group")
    shift_mlp: bool = Field(True, description="shift (power-of-two) MLP weights per group, instead of SVD")
    token_merge: Optional[TokenMergeSpace] = Field(default_factory=TokenMergeSpace)
    attention_skip: Optional[SkipSpace] = Field(default_factory=SkipSpace)
    quantize: list[Literal["none", "dynamic", "static"]] = Field(
        default_factory=lambda: ["none", "dynamic", "static"], min_length=1)

    @field_validator("rank_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"rank ratios are distinct numbers between 0 and 1 (got {ratios})")
        return ratios


def load_space(path: Path) -> SearchSpace:
    """Read and validate a ``--space`` YAML file; a :class:`RecipeError` naming the file and key otherwise."""
    data = read_yaml_file(path, "--space")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a search space is a mapping (see docs/tune.md), got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(str(path), "", exc, SearchSpace)) from None


class ResolvedSpace(BaseModel):
    """A :class:`SearchSpace` fitted to one model: its groups, r and skip bounds, and what its architecture refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int
    tokens: int
    groups: list[list[int]]
    rank_ratios: list[float]
    svd_linears: list[str]
    whitening: str
    taylor: bool
    shift_mlp: bool
    r_max: int
    schedules: list[str]
    max_skip: int
    skip_order: list[int] = Field(default_factory=list, description="blocks in the order greedy linear CKA "
                                  "removes their attention from the original (PIVOT); a trial skips the first k")
    quantize: list[str]
    refused: dict[str, str] = Field(description="transform → why the model's architecture refuses it")

    @property
    def dimensions(self) -> int:
        per_group = len(self.svd_linears) * bool(self.rank_ratios) + self.taylor + self.shift_mlp
        return (len(self.groups) * per_group + (self.r_max > 0) + (self.max_skip > 0) + (len(self.quantize) > 1))


PROBE_IMAGES = 4


def _refusal(model: Any, steps: list, input_size: tuple[int, ...]) -> Optional[str]:
    """Why applying ``steps`` to a copy of ``model`` fails for its architecture (None: it applies). Noise images
    stand in for calibration: the probe asks whether the structure is accepted, not how well."""
    import torch

    from vitcompress.transforms.apply import apply_steps

    noise = torch.randn(PROBE_IMAGES, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        apply_steps(copy.deepcopy(model), steps, lambda where: lambda: [noise])
    except VitCompressError as exc:
        return str(exc)
    return None


def resolve_space(space: SearchSpace, model: Any, input_size: tuple[int, ...],
                  calibration: Callable[[], Iterable[Any]]) -> ResolvedSpace:
    """Fit ``space`` to ``model`` (a timm ViT): groups, bounds from its depth and tokens, and each transform probed
    on its first block; a refused transform leaves the space (``refused`` says why). The attention blocks a trial
    may skip are ranked once, on the original, by greedy linear CKA over ``calibration`` batches, so every trial
    (and its replay) names its skipped blocks explicitly."""
    from vitcompress.sensitivity_map import block_groups
    from vitcompress.transforms.lowrank import LowRankConfig
    from vitcompress.transforms.shift_linear import ShiftConfig
    from vitcompress.transforms.skip import SkipConfig
    from vitcompress.transforms.taylor import TaylorConfig
    from vitcompress.transforms.token_merge import TokenMergeConfig

    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TargetError(f"{type(model).__name__} has no transformer blocks (model.blocks): tune searches a "
                          "timm ViT's blocks")
    depth = len(blocks)
    if space.groups is not None and space.groups > depth:
        raise RecipeError(f"--space groups: {space.groups} groups, but the model has {depth} blocks")
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None) or 0
    tokens = int(patches) + int(getattr(model, "num_prefix_tokens", 1))
    refused: dict[str, str] = {}
    probes = {
        "svd_lowrank": [LowRankConfig(targets=[f"blocks.0.{m}" for m in LINEAR_MODULE.values()],
                                      rank_ratio=min(space.rank_ratios, default=0.125))],
        "taylor_attention": [TaylorConfig(targets=["blocks.0.attn"])],
        "shift_linear": [ShiftConfig(targets=["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"])],
        "token_merge": [TokenMergeConfig(r=1)],
        "attention_skip": [SkipConfig(blocks=[0])],
    }
    wanted = {"svd_lowrank": bool(space.rank_ratios and space.svd_linears), "taylor_attention": space.taylor,
              "shift_linear": space.shift_mlp, "token_merge": space.token_merge is not None,
              "attention_skip": space.attention_skip is not None}
    for name, steps in probes.items():
        reason = _refusal(model, steps, input_size) if wanted[name] else None
        if reason is not None:
            refused[name] = reason
    usable = {name: wanted[name] and name not in refused for name in probes}
    r_max = 0
    if usable["token_merge"]:
        merge = space.token_merge
        by_floor = int((tokens - 1) * (1 - merge.min_tokens_kept) // depth)
        r_max = min(merge.r_max, by_floor) if merge.r_max is not None else by_floor
    max_skip = int(depth * space.attention_skip.max_fraction) if usable["attention_skip"] else 0
    skip_order: list[int] = []
    if max_skip:
        from vitcompress.transforms.apply import apply_steps

        ranked = apply_steps(copy.deepcopy(model), [SkipConfig(select="cka", count=max_skip)],
                             lambda where: calibration)[0]
        skip_order = [int(name.rpartition(".")[2]) for name in ranked.modules]
    return ResolvedSpace(
        depth=depth, tokens=tokens, groups=block_groups(depth, space.groups or min(4, depth)),
        rank_ratios=space.rank_ratios if usable["svd_lowrank"] else [],
        svd_linears=list(space.svd_linears) if usable["svd_lowrank"] else [], whitening=space.whitening,
        taylor=usable["taylor_attention"], shift_mlp=usable["shift_linear"], r_max=max(r_max, 0),
        schedules=list(space.token_merge.schedules) if space.token_merge else ["constant"], max_skip=max_skip,
        skip_order=skip_order,
        quantize=list(space.quantize), refused=refused)


class GroupChoice(BaseModel):
    """What a trial chose for one block group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranks: dict[str, float] = Field(default_factory=dict, description="Linear (qkv, proj, fc1, fc2) → rank ratio")
    taylor: bool = False
    shift_mlp: bool = False


class Choice(BaseModel):
    """One trial's point in the space: per group, and the global choices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: list[GroupChoice]
    skip: int = 0
    r: int = 0
    schedule: str = "constant"
    quantize: str = "none"

    def summary(self) -> str:
        """A one-line description, e.g. ``g0 fc1/8 fc2/8 · g1 taylor · skip 2 · ToMe r=4 · int8 dynamic``."""
        parts = []
        for i, group in enumerate(self.groups):
            bits = [f"{name}/{round(1 / ratio)}" for name, ratio in group.ranks.items()]
            bits += ["taylor"] * group.taylor + ["shift"] * group.shift_mlp
            if bits:
                parts.append(f"g{i} " + " ".join(bits))
        if self.skip:
            parts.append(f"skip {self.skip}")
        if self.r:
            parts.append(f"ToMe r={self.r}" + (" decreasing" if self.schedule == "decreasing" else ""))
        if self.quantize != "none":
            parts.append(f"int8 {self.quantize}")
        return " · ".join(parts) or "no change"


def suggest(trial: Any, space: ResolvedSpace) -> Choice:
    """Draw a :class:`Choice` from ``trial`` (an Optuna trial; define-by-run, so a group with shift MLP weights
    draws no fc1/fc2 ranks). Parameter names: ``g{i}.{linear}``, ``g{i}.taylor``, ``g{i}.shift_mlp``, ``skip``,
    ``r``, ``schedule``, ``quantize``."""
    rank_options = [NO_SVD, *(str(r) for r in space.rank_ratios)]
    groups = []
    for i in range(len(space.groups)):
        taylor = space.taylor and trial.suggest_categorical(f"g{i}.taylor", [False, True])
        shift = space.shift_mlp and trial.suggest_categorical(f"g{i}.shift_mlp", [False, True])
        ranks = {}
        for linear in space.svd_linears if space.rank_ratios else []:
            if shift and linear in ("fc1", "fc2"):
                continue
            chosen = trial.suggest_categorical(f"g{i}.{linear}", rank_options)
            if chosen != NO_SVD:
                ranks[linear] = float(chosen)
        groups.append(GroupChoice(ranks=ranks, taylor=taylor, shift_mlp=shift))
    skip = trial.suggest_int("skip", 0, space.max_skip) if space.max_skip else 0
    r = trial.suggest_int("r", 0, space.r_max) if space.r_max else 0
    schedule = trial.suggest_categorical("schedule", space.schedules) if r and len(space.schedules) > 1 \
        else space.schedules[0]
    quantize = trial.suggest_categorical("quantize", space.quantize) if len(space.quantize) > 1 \
        else space.quantize[0]
    return Choice(groups=groups, skip=skip, r=r, schedule=schedule, quantize=quantize)


def choice_params(choice: Choice, space: ResolvedSpace) -> dict[str, Any]:
    """The Optuna parameters that make ``choice`` (for ``study.enqueue_trial``): :func:`suggest` read backwards."""
    params: dict[str, Any] = {}
    for i, group in enumerate(choice.groups):
        if space.taylor:
            params[f"g{i}.taylor"] = group.taylor
        if space.shift_mlp:
            params[f"g{i}.shift_mlp"] = group.shift_mlp
        for linear in space.svd_linears if space.rank_ratios else []:
            if not (group.shift_mlp and linear in ("fc1", "fc2")):
                params[f"g{i}.{linear}"] = str(group.ranks[linear]) if linear in group.ranks else NO_SVD
    if space.max_skip:
        params["skip"] = choice.skip
    if space.r_max:
        params["r"] = choice.r
        if choice.r and len(space.schedules) > 1:
            params["schedule"] = choice.schedule
    if len(space.quantize) > 1:
        params["quantize"] = choice.quantize
    return params


def merge_schedule(r: int, schedule: str, blocks: list[int]) -> list[int]:
    """r per merging block: ``r`` in each (constant), or falling linearly from 2r to 0 (decreasing; same total)."""
    if schedule == "constant" or len(blocks) == 1:
        return [r] * len(blocks)
    last = len(blocks) - 1
    return [round(2 * r * (last - i) / last) for i in range(len(blocks))]


def _blocks_regex(blocks: list[int], tail: str) -> str:
    return rf"re:blocks\.({'|'.join(map(str, blocks))})\.{tail}"


#: Steps whose ONNX graph may differ from torch by more than float rounding: int8 activations (shift weights) and
#: discrete choices (which token pairs merge); with export quantization, every int8 graph.
INEXACT = {"shift_linear", "token_merge"}


def is_exact(recipe: Recipe) -> bool:
    """Whether the recipe's ONNX model should match its torch model to float rounding (the default parity gate)."""
    return recipe.export.quantize == "none" and not any(step.transform in INEXACT for step in recipe.steps)


def with_parity_gate(recipe: Recipe, measured_diff: float) -> Recipe:
    """``recipe`` with ``validate.max_abs_diff`` set from the difference a trial measured (×1.25, two significant
    digits, never below the default): int8 and merging graphs differ from float torch by design, as the shipped
    int8 recipes' own measured gates say; their accuracy and agreement are what the search constrains."""
    import math

    limit = measured_diff * 1.25
    scale = 10 ** (math.floor(math.log10(limit)) - 1) if limit > 0 else 1
    limit = max(math.ceil(limit / scale) * scale, recipe.validate_.max_abs_diff)
    return recipe.model_copy(update={"validate_": recipe.validate_.model_copy(update={"max_abs_diff": limit})})


def recipe_for(choice: Choice, space: ResolvedSpace, base: Recipe, source: str = "tune") -> Recipe:
    """The complete recipe of ``choice``: ``base``'s calibration, fine-tune and validate settings with the chosen
    steps (skip → Taylor → SVD → shift → token merging) and export quantization."""
    steps: list[dict[str, Any]] = []
    skipped = sorted(space.skip_order[: choice.skip])
    if skipped:
        steps.append({"transform": "attention_skip", "blocks": skipped})
    # a skipped block has no attention left for Taylor or for SVD of qkv/proj
    taylor_blocks = [b for g, blocks in zip(choice.groups, space.groups) if g.taylor for b in blocks
                     if b not in skipped]
    if taylor_blocks:
        steps.append({"transform": "taylor_attention", "targets": [_blocks_regex(taylor_blocks, "attn")]})
    by_ratio: dict[float, list[str]] = {}
    for group, blocks in zip(choice.groups, space.groups):
        for linear, ratio in group.ranks.items():
            where = [b for b in blocks if linear in ("fc1", "fc2") or b not in skipped]
            if where:
                by_ratio.setdefault(ratio, []).append(_blocks_regex(where, LINEAR_MODULE[linear].replace(".", r"\.")))
    for ratio, targets in sorted(by_ratio.items(), reverse=True):
        steps.append({"transform": "svd_lowrank", "targets": targets, "rank_ratio": ratio,
                      "whitening": space.whitening})
    shift_blocks = [b for g, blocks in zip(choice.groups, space.groups) if g.shift_mlp for b in blocks]
    if shift_blocks:
        steps.append({"transform": "shift_linear", "targets": [_blocks_regex(shift_blocks, r"mlp\.fc[12]")]})
    if choice.r:
        # ToMe needs softmax attention in every block from the first merging one on (or none, when skipped)
        start = max(taylor_blocks, default=-1) + 1
        merging = [b for b in range(start, space.depth) if b not in skipped]
        if merging:
            steps.append({"transform": "token_merge", "targets": [f"blocks.{b}" for b in merging],
                          "r": merge_schedule(choice.r, choice.schedule, merging)})
    data = base.model_dump(mode="json", by_alias=True)
    data["steps"] = steps
    data["export"] = {**data["export"], "quantize": choice.quantize}
    return parse_recipe(data, source)
