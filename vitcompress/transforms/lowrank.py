"""``svd_lowrank``: replace Linear layers by two thinner ones from a (optionally data-whitened) truncated SVD.

The rank of each layer comes from exactly one of ``rank`` (absolute), ``rank_ratio`` (of min(in, out)) or
``energy`` (the smallest rank whose components keep that fraction of the energy, see
:meth:`LowRankLinear.component_energy`). A factorisation that is not cheaper than the dense layer,
``r·(in+out) ≥ in·out``, is refused: it would be slower and less accurate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from vitcompress.errors import TargetError
from vitcompress.transforms.registry import MLP_LINEARS, TransformConfig, TransformInputs, default_targets, register
from vitcompress.transforms.select import replace_module, select_linears

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.layers.lowrank_linear import Whitening

log = logging.getLogger(__name__)


class LowRankConfig(TransformConfig):
    transform: Literal["svd_lowrank"] = "svd_lowrank"
    targets: list[str] = default_targets(MLP_LINEARS, "both MLP Linears of every block")
    rank: Optional[int] = Field(None, ge=1, description="absolute rank of every target")
    rank_ratio: Optional[float] = Field(None, gt=0, lt=1, description="rank as a fraction of min(in, out)")
    energy: Optional[float] = Field(None, gt=0, le=1, description="fraction of spectral energy to keep")
    whitening: Literal["none", "pca", "cholesky"] = Field(
        "none", description="none: SVD of W; pca / cholesky: data-aware, from calibration activations"
    )

    @model_validator(mode="after")
    def _one_rank_rule(self) -> "LowRankConfig":
        given = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, rank_ratio, energy (got {', '.join(given) or 'none'})")
        return self


def choose_rank(config: LowRankConfig, linear: nn.Linear, gram: torch.Tensor | None) -> int:
    """The rank the config asks for on this layer."""
    import torch

    from vitcompress.layers.lowrank_linear import LowRankLinear

    out_features, in_features = linear.weight.shape
    if config.rank is not None:
        return config.rank
    if config.rank_ratio is not None:
        return max(1, round(config.rank_ratio * min(in_features, out_features)))
    energy = LowRankLinear.component_energy(linear, config.whitening, gram)
    kept = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
    return int(torch.searchsorted(kept, torch.tensor(config.energy, dtype=kept.dtype) - 1e-12).item()) + 1


#: Columns per block of :func:`add_gram`'s products: one GEMM per block row of the upper triangle.
GRAM_BLOCK = 384


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper triangle (diagonal included) of ``xᵀx`` to ``total`` (float64, in×in); ``x`` is (tokens × in).

    In float64, one GEMM per block row of the upper triangle: 5/8 of the full product's work for 1536 inputs (1.42 s
    instead of 2.05 s for 25,216 tokens × 1536 on 2 cores, measured 2026-12-07, AMD EPYC), the same sums in another
    order. Not float32: its rounding (about 1e-7 of the largest products) exceeds the Cholesky whitening's jitter
    (1e-6 of the mean diagonal) where a few channels dominate, and the factorisation of a rank-deficient Gram
    matrix (fewer tokens than inputs) then fails. The lower triangle is left to :func:`symmetric`."""
    x = x.double()
    width = x.shape[1]
    for start in range(0, width, GRAM_BLOCK):
        end = start + GRAM_BLOCK
        total[start:end, start:] += x[:, start:end].T @ x[:, start:]


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return upper.triu() + upper.triu(1).T


def input_grams(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """``XᵀX`` (float64, in×in) of the inputs of each named Linear over all tokens of the calibration batches, in
    one pass (:func:`add_gram` per batch)."""
    import torch

    from vitcompress.hooks import run_with_hooks

    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if name not in grams:
                grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            add_gram(grams[name], x)
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    run_with_hooks(model, batches, hooks)
    return {name: symmetric(gram) for name, gram in grams.items()}


@register(LowRankConfig)
def apply_lowrank(model: nn.Module, config: LowRankConfig, inputs: TransformInputs) -> list[str]:
    """Factor each target Linear W (out×in) into two Linears by truncated SVD, W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ);
    `whitening: pca | cholesky` uses calibration activations (SVD-LLM) to minimise the output error instead."""
    from vitcompress.layers.lowrank_linear import LowRankLinear

    step = "svd_lowrank"
    targets = select_linears(model, config.targets, config.ignore, step)
    whitening: Whitening = config.whitening
    grams = input_grams(model, [n for n, _ in targets], inputs.calibration_batches()) if whitening != "none" else {}
    missed = [name for name, _ in targets if whitening != "none" and name not in grams]
    if missed:
        more = f"; {len(missed) - 1} more like it" if len(missed) > 1 else ""
        raise TargetError(
            f"{step}: whitening {whitening!r} needs the inputs of {missed[0]}, but calibration never reached it "
            f"(its forward did not run on the calibration images{more}): "
            "the model does not call it, or applies its weight another way; leave it out with ignore: or use "
            "whitening: none")
    plans = []
    for name, linear in targets:
        out_features, in_features = linear.weight.shape
        rank = choose_rank(config, linear, grams.get(name))
        if rank > min(in_features, out_features):
            raise TargetError(f"{step}: {name}: rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        if rank * (in_features + out_features) >= in_features * out_features:
            cheaper = (in_features * out_features - 1) // (in_features + out_features)
            raise TargetError(
                f"{step}: {name}: rank {rank} is not cheaper than the dense {out_features}×{in_features} layer "
                f"({rank}·({in_features}+{out_features}) ≥ {in_features}·{out_features}); use rank ≤ {cheaper}"
            )
        plans.append((name, linear, rank))
    for name, linear, rank in plans:
        replace_module(model, name, LowRankLinear.from_linear(linear, rank, whitening, grams.get(name)))
        log.info("%s: %s → rank %d", step, name, rank)
    return [name for name, _, _ in plans]
