"""Export-time choice of the MoE export form for ``shiftadd_moe`` layers with ``dispatch: auto``.

The two static forms of :class:`~vitcompress.layers.moe_linear.MoELinear` compute the same function:
``where`` runs both experts on every token (no data-dependent shapes, but the work of both experts),
``gather`` runs each expert on its own tokens (the work of one expert, plus NonZero/Gather/ScatterND).
Which is faster depends on the CPU, the layer sizes and how the trained router splits the tokens, so the
export stage exports the converted model in each form, times both in onnxruntime on real validation images
(interleaved, the validate stage's threads and batch sizes) and keeps the faster; the report gives both.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from vitcompress.context import RunContext
from vitcompress.evaluate import latency, latency_images
from vitcompress.layers.moe_linear import MoELinear

DISPATCH_RUNS = 10
FORMS = ("where", "gather")


def auto_layers(model: nn.Module) -> list[str]:
    """Names of the MoE layers whose export form is still to be chosen."""
    return [name for name, m in model.named_modules() if isinstance(m, MoELinear) and m.dispatch == "auto"]


def set_dispatch(model: nn.Module, names: list[str], dispatch: str) -> None:
    for name in names:
        model.get_submodule(name).dispatch = dispatch


def choose(ctx: RunContext, export: Callable[[nn.Module, Path], Path]) -> dict | None:
    """Export ``ctx.model`` to ``ctx.onnx_path`` in the faster MoE form; None when no layer asks for ``auto``.

    The choice is by the geometric mean over batch sizes of the p50 ratio gather / where."""
    names = auto_layers(ctx.model)
    if not names:
        return None
    config = ctx.recipe.validate_
    ctx.progress.stage("export", f"{len(names)} MoE layers with dispatch auto: timing where vs gather")
    paths = {}
    for form in FORMS:
        set_dispatch(ctx.model, names, form)
        paths[form] = export(ctx.model, ctx.scratch_dir / f"moe_{form}.onnx")
    images = latency_images(ctx.data.val, max(config.batch_sizes))
    timing = latency(paths, config, images, runs=DISPATCH_RUNS)
    ratios = [timing["gather"][b]["p50_ms"] / timing["where"][b]["p50_ms"] for b in timing["where"]]
    ratio = math.exp(sum(map(math.log, ratios)) / len(ratios))
    chosen = "gather" if ratio < 1 else "where"
    set_dispatch(ctx.model, names, chosen)
    shutil.move(paths[chosen], ctx.onnx_path)
    return {"layers": len(names), "chosen": chosen, "gather_over_where": ratio, "runs": DISPATCH_RUNS,
            "latency": {form: {b: t["p50_ms"] for b, t in timing[form].items()} for form in FORMS}}
