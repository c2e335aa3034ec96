"""The fine-tune loop: brief distillation of a student from its frozen teacher, given as explicit arguments.

:func:`train` takes the models, the training images, the recipe's ``finetune`` section, this process's place in
a torchrun job and a progress sink; it knows nothing of a conversion's context (the fine-tune stage and
:func:`vitcompress.pipeline.finetune` build the arguments from it; docs/architecture.md).

Loss = ``labels_ce``·CE(labels) (labelled data only) + ``logits_kl``·T²·KL(teacher_T ‖ student_T) + every
module's ``aux_loss`` (e.g. MoE load balance). AdamW with linear warm-up then cosine decay over a budget of
optimizer steps, gradient clipping, and two guards against divergence, both reported (the gates then judge the
model that is kept): a step whose loss or gradient norm is not finite is not applied, training stops there and
the last good weights are kept; when the loss (smoothed, as an exponential moving average) grows past
``max_loss_ratio`` × the first loss — what too high a learning rate does to AdamW, whose normalised steps keep the
loss finite while the weights wander — training stops and the weights from before the run are restored. Training
runs on ``config.device`` (a GPU when one is there, by default); the models are back on the CPU afterwards, for
export.

Under ``torchrun`` the same loop runs in every process with DistributedDataParallel: each rank takes
``batch_size / world_size`` images of the global batch (:mod:`vitcompress.training.data`), the gradients
are averaged, and the loss the guard judges is averaged over the ranks, so every rank takes the same decisions.
``precision`` bf16/fp16 runs the forward passes under autocast (fp16 with a gradient scaler); ``auto`` picks bf16
where the device computes it natively (:func:`resolve_precision`), fp32 elsewhere. With
``checkpoint_every``, rank 0 saves a checkpoint (:mod:`vitcompress.training.checkpoint`) every so many steps and
when SIGTERM arrives; a resumed conversion continues from it exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from vitcompress.errors import DataError, RecipeError, ResumeError
from vitcompress.progress import LogProgress, Progress
from vitcompress.recipe import FinetuneConfig
from vitcompress.report import FinetuneRun
from vitcompress.training import checkpoint, distributed
from vitcompress.training.data import train_batches
from vitcompress.training.distributed import Dist

log = logging.getLogger("vitcompress")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

FROZEN_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "reg_token")


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
            kept = f"the weights of step {step - 1}" if step else "the weights from before the fine-tune"
            return f"non-finite loss or gradient at step {step}: stopped, kept {kept}", False
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


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 config: FinetuneConfig, student_tokens: torch.Tensor | None = None,
                 teacher_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """``logits_kl``·T²·KL + ``labels_ce``·CE (labelled images) + ``tokens_mse``·MSE(final tokens), in fp32."""
    d = config.distill
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    t = d.temperature
    loss = d.logits_kl * t * t * F.kl_div(
        F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True,
        reduction="batchmean",
    )
    has_label = labels >= 0
    if d.labels_ce > 0 and has_label.any():
        loss = loss + d.labels_ce * F.cross_entropy(student_logits[has_label], labels[has_label])
    if d.tokens_mse > 0 and student_tokens is not None and teacher_tokens is not None:
        loss = loss + d.tokens_mse * F.mse_loss(student_tokens.float(), teacher_tokens.float())
    return loss


class TokensAndLogits(nn.Module):
    """A timm ViT seen as ``(final tokens, logits)``: ``forward_features`` (the tokens before the head, for
    ``tokens_mse``) then ``forward_head``, what its ``forward`` does in one call. One module, so that
    DistributedDataParallel sees every forward."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.vit.forward_features(images)
        return tokens, self.vit.forward_head(tokens)


def training_device(requested: str) -> torch.device:
    """The torch device for ``finetune.device``: ``auto`` picks CUDA when available; ``cuda`` without it is an
    error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RecipeError("finetune.device: cuda was asked for, but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu")


@dataclass(frozen=True)
class Checkpoints:
    """Where and when a fine-tune saves checkpoints (rank 0), and the state a resume continues from.

    Attributes:
        directory: where checkpoints go; None: none are saved or read.
        every: save one every this many optimizer steps (and on SIGTERM); None: none are saved.
        resume: continue from the checkpoint in ``directory`` (``convert --resume``).
        place: this process's place in the torchrun job (rank 0 reads and writes, every rank waits for it).
    """

    directory: Path | None
    every: int | None
    resume: bool = False
    place: Dist = field(default_factory=Dist)

    @property
    def enabled(self) -> bool:
        return self.every is not None and self.directory is not None

    def due(self, steps_done: int, budget: int) -> bool:
        return self.enabled and steps_done % self.every == 0 and steps_done < budget

    def resume_state(self) -> checkpoint.TrainState | None:
        """The checkpoint to continue from (read by rank 0, sent to every rank); None without ``--resume``."""
        if not (self.resume and self.directory is not None):
            return None
        state = [checkpoint.load(self.directory) if self.place.is_main else None]
        if self.place.enabled:
            torch_dist.broadcast_object_list(state, src=0)
        if state[0] is None:
            raise ResumeError(f"--resume: no checkpoint in {self.directory}: run without --resume")
        return state[0]

    def save(self, state: checkpoint.TrainState) -> None:
        """Rank 0 writes ``state``; every rank waits for it, so none exits while the checkpoint is half-written."""
        if self.place.is_main:
            path = checkpoint.save(self.directory, state)
            log.info("checkpoint: %s", path)
        if self.place.enabled:
            torch_dist.barrier()


class HeldSigterm:
    """While training with checkpoints, SIGTERM only sets a flag: the loop saves a checkpoint at the end of the
    step, then :meth:`redeliver` hands the signal to the handler that was there before (the CLI's, which cleans
    up and exits 143), or exits with 143 when there was none."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.previous = None

    def is_set(self) -> bool:
        return self.flag.is_set()

    def redeliver(self) -> None:
        if callable(self.previous):
            self.previous(signal.SIGTERM, None)
        raise SystemExit(128 + signal.SIGTERM)

    @contextlib.contextmanager
    def held(self, enabled: bool) -> Iterator[HeldSigterm]:
        usable = enabled and threading.current_thread() is threading.main_thread()
        self.previous = signal.getsignal(signal.SIGTERM) if usable else None
        if not usable or self.previous is signal.SIG_IGN:
            yield self
            return
        signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.set())
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, self.previous)


#: /proc/cpuinfo flags of a CPU that computes bf16 natively (dot products in AVX512-BF16, or AMX tiles).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_precision(precision: str, device: torch.device, cpu_flags: set[str] | None = None) -> str:
    """The autocast precision a run uses: ``precision`` itself, or for ``auto`` bf16 where ``device`` computes it
    natively and fp32 elsewhere. Measured on the ``taylor`` recipe (vit_fmnist, 1,000 steps, AMD EPYC with
    AVX512-BF16, 2 threads, 2026-12-04): bf16 95 img/s against fp32 45, 88.39 % and 94.52 % agreement against
    88.36 % and 94.45 %. A CPU without native bf16 emulates it, slower than fp32, hence fp32 there.

    Args:
        precision: the recipe's ``finetune.precision``.
        device: where the fine-tune runs.
        cpu_flags: the CPU's feature flags (default: read from ``/proc/cpuinfo``; none elsewhere).
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    return "bf16" if flags & set(NATIVE_BF16_FLAGS) else "fp32"


def _cpu_flags() -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def train(student: nn.Module, teacher: nn.Module, data: Dataset, config: FinetuneConfig, *, place: Dist | None = None,
          progress: Progress | None = None, label: str = "", stage: int = 0, done: list[dict] | None = None,
          saver: Checkpoints | None = None, resume: checkpoint.TrainState | None = None) -> FinetuneRun:
    """Distil ``student`` from ``teacher`` for ``config.steps`` optimizer steps; returns the run's summary.

    Args:
        student: the model to train, in place; afterwards on the CPU, in eval mode, without gradients.
        teacher: the frozen model whose logits (and final tokens, for ``tokens_mse``) the student learns.
        data: the training set of ``(image, label)`` pairs, label -1 where there is none.
        config: the recipe's ``finetune`` section.
        place: this process's place in a torchrun job (default: alone).
        progress: where the run reports its steps (default: :class:`~vitcompress.progress.LogProgress`).
        label: what the progress line calls this run (e.g. ``stage 1/2``).
        stage: this run's index among ``finetune.stages``, recorded in its checkpoints.
        done: the summaries of the stages finished before this one, recorded in its checkpoints.
        saver: where and when to checkpoint (None: never, and SIGTERM is left alone).
        resume: a checkpoint of this very run to continue from (:meth:`Checkpoints.resume_state`).
    """
    place = Dist() if place is None else place
    progress = LogProgress() if progress is None else progress
    device = distributed.device_for(place) or training_device(config.device)
    torch.manual_seed(config.seed)
    for name, param in student.named_parameters():
        param.requires_grad_(not (config.freeze_embed and name.split(".")[0] in FROZEN_EMBEDDINGS))
    params = [p for p in student.parameters() if p.requires_grad]
    before = {name: value.detach().clone() for name, value in student.state_dict().items()}
    guard = DivergenceGuard(config.max_loss_ratio)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    precision = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batches = train_batches(data, config.batch_size, place, config.seed, config.workers,
                            pin_memory=device.type == "cuda")
    run = {"losses": [], "seen": 0, "seconds": 0.0, "skipped": 0}
    if resume is not None:
        before = _resume_into(student, optimizer, scheduler, scaler, guard, resume)
        run = dict(resume.progress["run"])
    start = resume.step if resume is not None else 0
    where = f"{place.world_size} processes ({place.backend}), {batches.per_rank_batch} images each, " \
        if place.enabled else ""
    progress.stage("finetune", f"{label + ': ' if label else ''}{config.steps} steps, batch {config.batch_size}, "
                               f"{where}lr {config.lr:g}, {precision}, on {device}"
                               + (f", resumed at step {start}" if resume is not None else ""))
    student.to(device)
    teacher.to(device)
    net = TokensAndLogits(student)
    # routed layers (those with an aux_loss, e.g. MoE) may leave an expert without tokens, hence without gradient
    routed = any(hasattr(module, "aux_loss") for module in student.modules())
    model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                    find_unused_parameters=routed) if place.enabled else net
    teacher_net = TokensAndLogits(teacher)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32")
    progress.start("finetune", config.steps)
    if start:
        progress.advance("finetune", start)
    student.train()
    losses, stopped = run["losses"], None
    t0 = time.perf_counter() - run["seconds"]
    stream = batches.from_step(start)
    with HeldSigterm().held(saver is not None and saver.enabled) as terminating:
        for step in range(start, config.steps):
            images, labels, dropped = next(stream)
            for reason in dropped:
                log.warning("fine-tune: skipped an unreadable image: %s", reason)
            run["skipped"] += len(dropped)
            if images is None:
                raise DataError(f"fine-tune step {step}: no image of the batch could be read ({dropped[0]})")
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                with torch.no_grad():
                    teacher_tokens, teacher_logits = teacher_net(images)
                student_tokens, student_logits = model(images)
            loss = distill_loss(student_logits, teacher_logits, labels, config, student_tokens, teacher_tokens)
            extra = aux_loss(student)
            if extra is not None:
                loss = loss + extra.float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            shared = distributed.mean(torch.stack([loss.detach().float().cpu(), torch.tensor(float(len(images))),
                                                   torch.tensor(float(terminating.is_set()))]).to(device), place)
            # fp16: an overflowing gradient is the scaler's business (it skips the step and lowers the scale)
            verdict = guard.check(step, shared[0], torch.zeros(()) if scaler.is_enabled() else grad_norm)
            if verdict:
                stopped, restore = verdict
                if restore:
                    student.load_state_dict(before)
                break
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run["seen"] += round(shared[1].item() * place.world_size)
            losses.append(shared[0].item())
            progress.advance("finetune", loss=losses[-1], img_s=run["seen"] / (time.perf_counter() - t0))
            sigterm = shared[2].item() > 0
            if saver is not None and (saver.due(step + 1, config.steps) or (sigterm and saver.enabled)):
                run["seconds"] = time.perf_counter() - t0
                saver.save(checkpoint.TrainState(
                    stage=stage, step=step + 1, student=student.state_dict(), before=before,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    rng=checkpoint.rng_states(),
                    progress={"run": {**run, "guard": [guard.first, guard.smoothed]}, "done": done or []}))
            if sigterm:
                terminating.redeliver()
    progress.finish("finetune")
    student.cpu()
    teacher.cpu()
    student.eval()
    student.requires_grad_(False)
    seconds = time.perf_counter() - t0
    return FinetuneRun(
        steps_done=len(losses), steps_budget=config.steps, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, seconds=seconds,
        images_per_second=run["seen"] / max(seconds, 1e-9), stopped=stopped, device=str(device),
        world_size=place.world_size, per_rank_batch=batches.per_rank_batch, backend=place.backend,
        precision=precision, workers=batches.workers, skipped_images=run["skipped"],
        resumed_from_step=resume.step if resume is not None else None,
    )


def _resume_into(student: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 guard: DivergenceGuard, state: checkpoint.TrainState) -> dict[str, torch.Tensor]:
    """Load a checkpoint's weights and training state; returns its weights from before the run."""
    try:
        student.load_state_dict(state.student)
    except RuntimeError as exc:
        raise ResumeError(f"--resume: the checkpoint's weights do not fit the converted model "
                          f"({str(exc).splitlines()[0]}): start over without --resume") from None
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    scaler.load_state_dict(state.scaler)
    checkpoint.restore_rng(state.rng)
    guard.first, guard.smoothed = state.progress["run"]["guard"]
    return state.before
