"""Stage 3 — fine-tune: brief distillation of the converted student from the frozen original (design.md §4).

Loss = ``labels_ce``·CE(labels) (labelled data only) + ``logits_kl``·T²·KL(teacher_T ‖ student_T) + every
module's ``aux_loss`` (e.g. MoE load balance). AdamW with linear warm-up then cosine decay over a budget of
optimizer steps, gradient clipping, and two guards against divergence, both reported (the gates then judge the
model that is kept): a step whose loss or gradient norm is not finite is not applied, training stops there and
the last good weights are kept; when the loss (smoothed, as an exponential moving average) grows past
``max_loss_ratio`` × the first loss — what too high a learning rate does to AdamW, whose normalised steps keep the
loss finite while the weights wander — training stops and the weights from before the run are restored. Training runs on
``config.device`` (a GPU when one is there, by default); the models are back on the CPU afterwards, for export.

Staged (``finetune.stages``, as ShiftAddViT's attention-then-MoE schedule): each stage first applies its
group of recipe steps, then trains ``steps`` optimizer steps; the report sums the stages and lists each.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.context import RunContext
from vitcompress.errors import RecipeError
from vitcompress.recipe import FinetuneConfig, staged_steps
from vitcompress.stages.transform import apply_steps

FROZEN_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "reg_token")


def _cycle(loader):
    while True:
        yield from loader


def _schedule(config: FinetuneConfig):
    warmup = min(config.warmup_steps, config.steps - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    return factor


class DivergenceGuard:
    """Why training must stop (or None): a non-finite loss or gradient, or a smoothed loss ``max_loss_ratio``
    times the first. The floor of 0.1 on the reference keeps a near-zero first loss (a student already equal to
    its teacher) from turning batch noise into a divergence."""

    SMOOTHING = 0.2

    def __init__(self, max_loss_ratio: float) -> None:
        self.max_loss_ratio = max_loss_ratio
        self.first: float | None = None
        self.smoothed = 0.0

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[str, bool] | None:
        """None while training is sound; else (why, whether to restore the weights from before the run)."""
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            return f"non-finite loss or gradient at step {step}: stopped, kept the weights of step {step - 1}", False
        value = loss.item()
        if self.first is None:
            self.first = self.smoothed = value
        self.smoothed += self.SMOOTHING * (value - self.smoothed)
        limit = self.max_loss_ratio * max(self.first, 0.1)
        if self.smoothed > limit:
            return (f"diverged at step {step}: smoothed loss {self.smoothed:.3g} > {self.max_loss_ratio:g} × first "
                    f"loss {self.first:.3g} (is the learning rate too high?): stopped, restored the weights from "
                    "before the fine-tune"), True
        return None


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses that layers stored during the last forward (None when there are none)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return torch.stack(losses).sum() if losses else None


def distill_loss(student_logits, teacher_logits, labels, config: FinetuneConfig) -> torch.Tensor:
    d = config.distill
    t = d.temperature
    loss = d.logits_kl * t * t * F.kl_div(
        F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True,
        reduction="batchmean",
    )
    has_label = labels >= 0
    if d.labels_ce > 0 and has_label.any():
        loss = loss + d.labels_ce * F.cross_entropy(student_logits[has_label], labels[has_label])
    return loss


def training_device(requested: str) -> torch.device:
    """The torch device for ``finetune.device``: ``auto`` picks CUDA when available; ``cuda`` without it is an
    error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RecipeError("finetune.device: cuda was asked for, but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu")


def run(ctx: RunContext) -> None:
    config = ctx.recipe.finetune
    if config is None:
        ctx.report["finetune"] = None
        return
    stages = staged_steps(ctx.recipe)
    if not stages:
        ctx.report["finetune"] = train(ctx, config)
        return
    results: list[dict] = []
    for number, indices in enumerate(stages):
        ctx.report["steps"] += apply_steps(ctx, ctx.model, ctx.recipe.model_steps, indices)
        if results and results[-1]["stopped"]:
            continue  # a stopped stage ends training, but the recipe's transforms are all still applied
        results.append({"transforms": config.stages[number], **train(ctx, config, f"stage {number + 1}/{len(stages)}")})
    seconds = sum(r["seconds"] for r in results)
    steps_done = sum(r["steps_done"] for r in results)
    ctx.report["finetune"] = {
        "steps_done": steps_done, "steps_budget": config.steps * len(stages),
        "first_loss": results[0]["first_loss"], "last_loss": results[-1]["last_loss"], "seconds": seconds,
        "images_per_second": steps_done * config.batch_size / max(seconds, 1e-9), "stopped": results[-1]["stopped"],
        "device": results[-1]["device"], "stages": results,
    }


def train(ctx: RunContext, config: FinetuneConfig, label: str = "") -> dict:
    """Distil ``ctx.model`` from the original for ``config.steps`` optimizer steps; returns the run's summary."""
    student, teacher = ctx.model, ctx.original.model
    device = training_device(config.device)
    torch.manual_seed(config.seed)
    for name, param in student.named_parameters():
        param.requires_grad_(not (config.freeze_embed and name.split(".")[0] in FROZEN_EMBEDDINGS))
    params = [p for p in student.parameters() if p.requires_grad]
    before = {name: value.detach().clone() for name, value in student.state_dict().items()}
    guard = DivergenceGuard(config.max_loss_ratio)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    loader = torch.utils.data.DataLoader(
        ctx.data.train, batch_size=min(config.batch_size, len(ctx.data.train)), shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = _cycle(loader)
    ctx.progress.stage("finetune", f"{label + ': ' if label else ''}{config.steps} steps, batch {config.batch_size}, "
                                   f"lr {config.lr:g}, on {device}")
    student.to(device)
    teacher.to(device)
    ctx.progress.start("finetune", config.steps)
    student.train()
    losses, stopped, t0, seen = [], None, time.perf_counter(), 0
    for step in range(config.steps):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = distill_loss(student(images), teacher_logits, labels, config)
        extra = aux_loss(student)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        verdict = guard.check(step, loss, grad_norm)
        if verdict:
            stopped, restore = verdict
            if restore:
                student.load_state_dict(before)
            break
        optimizer.step()
        scheduler.step()
        seen += len(images)
        losses.append(loss.item())
        ctx.progress.advance("finetune", loss=losses[-1], img_s=seen / (time.perf_counter() - t0))
    ctx.progress.finish("finetune")
    student.cpu()
    teacher.cpu()
    student.eval()
    student.requires_grad_(False)
    return {
        "steps_done": len(losses), "steps_budget": config.steps, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - t0,
        "images_per_second": seen / max(time.perf_counter() - t0, 1e-9), "stopped": stopped,
        "device": str(device),
    }
