"""Train an embedded reference model (``vit_fmnist``, 50 tokens, or ``vit_fmnist196``, 197) on Fashion-MNIST
train (docs/reference-models.md).

Seeded and resumable: the full training state (the epoch's shuffle, the step, the random generator) is saved
to ``--state-dir`` every ``--save-every`` steps and after every epoch, and a rerun of the same command continues
from the last save with the same batches. When training ends, the weights are written as fp16 safetensors into
the package (``vitcompress/weights/<model>.safetensors``) and the test-split top-1 is printed. On CPU, bf16
autocast is used where the CPU supports it (about 2× faster here).

``--init-from`` starts from another reference model's weights: every tensor of the same shape is copied, and
timm's ``checkpoint_filter_fn`` resamples the patch embedding and the position embedding to the new grid (this
is how ``vit_fmnist196`` starts from ``vit_fmnist``: one 196-token epoch took 26–37 min on 2 cores, about 6× a
50-token one).

    python examples/train_reference.py --epochs 12
    python examples/train_reference.py --model vit_fmnist196 --init-from vit_fmnist --epochs 3 --lr 3e-4 --warmup-steps 50
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitcompress.data import FMNIST_MEAN, FMNIST_STD, load_fmnist_arrays, normalize_uint8
from vitcompress.models import (
    REFERENCE_MODEL,
    REFERENCE_MODELS,
    build_reference_architecture,
    load_weights,
    read_state_dict,
    reference_weights_path,
)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 28×28 crop of the 2-pixel zero-padded image and random horizontal flip, batched. The random draws
    come from the CPU ``generator`` (the resumable state) whatever device ``images`` are on."""
    n, device = images.shape[0], images.device
    padded = F.pad(images, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator).to(device)
    dy = torch.randint(0, 5, (n,), generator=generator).to(device)
    offsets = torch.arange(28, device=device)
    rows = (dy[:, None] + offsets)[:, :, None].expand(n, 28, 28)
    cols = (dx[:, None] + offsets)[:, None, :].expand(n, 28, 28)
    out = padded[torch.arange(n, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        x = normalize_uint8(images[start:start + 1000], FMNIST_MEAN, FMNIST_STD)
        correct += (model(x).argmax(-1) == labels[start:start + 1000]).sum().item()
    return correct / len(images)


def usable_device(name: str) -> torch.device:
    """The torch device ``name``, or one ``error:`` line and exit code 2 when it is not a device or this machine
    has none of it (``--device cuda`` without a GPU), before anything is read or written."""
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"error: --device {name}: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=REFERENCE_MODELS, default=REFERENCE_MODEL)
    parser.add_argument("--init-from", choices=REFERENCE_MODELS, help="start from this model's embedded weights")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up (default: one epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=25, help="steps between saves of the training state")
    parser.add_argument("--state-dir", type=Path, help="default: checkpoints/train_<model>")
    parser.add_argument("--out", type=Path, help="default: the package's weights/<model>.safetensors")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps of this run (state saved; a rerun "
                        "goes on): training that spans time-boxed sessions")
    parser.add_argument("--train-images", type=int, help="first N train images only (a quick check of the script)")
    parser.add_argument("--test-images", type=int, help="first N test images only")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 even where bf16 autocast works")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda); the shuffle and "
                        "augmentation draws stay on the CPU generator, so a run resumes the same on any device")
    args = parser.parse_args()
    state_dir = args.state_dir or Path(f"checkpoints/train_{args.model}")
    out = args.out or reference_weights_path(args.model)

    torch.manual_seed(args.seed)
    device = usable_device(args.device)
    train_x, train_y = (t[:args.train_images].to(device) for t in load_fmnist_arrays("train"))
    test_x, test_y = (t[:args.test_images].to(device) for t in load_fmnist_arrays("test"))
    model = build_reference_architecture(args.model)
    if args.init_from:
        load_weights(model, read_state_dict(reference_weights_path(args.init_from)), args.init_from)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch if args.warmup_steps is None else args.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, start_step, order, running, history = 0, 0, None, 0.0, []
    state_file = state_dir / "last.pt"
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"].cpu())
        start_epoch, history = state["epoch"], json.loads(state["history"])
        # states saved per epoch only (before mid-epoch saves existed) resume at the epoch's start
        start_step, order, running = state.get("step", 0), state.get("order"), state.get("running", 0.0)
        print(f"resumed at epoch {start_epoch + 1}, step {start_step}")

    def save(epoch: int, step: int) -> None:
        """The whole training state, written atomically: a rerun resumes from here with the same batches."""
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(), "epoch": epoch,
                    "step": step, "order": order, "running": running, "history": json.dumps(history)},
                   state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)

    use_bf16, steps_this_run = not args.no_bf16, 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        if start_step == 0:
            order, running = torch.randperm(len(train_x), generator=generator), 0.0
        for step in range(start_step, steps_per_epoch):
            if steps_this_run == args.max_steps:
                save(epoch, step)
                print(f"stopped after {steps_this_run} steps (--max-steps) at epoch {epoch + 1}, step {step}: "
                      "rerun the same command to go on")
                return
            steps_this_run += 1
            idx = order[step * args.batch_size:(step + 1) * args.batch_size].to(device)
            x = normalize_uint8(augment(train_x[idx], generator), FMNIST_MEAN, FMNIST_STD)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running += loss.item()
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss.item():.4f}", flush=True)
            if (step + 1) % args.save_every == 0 and step + 1 < steps_per_epoch:
                save(epoch, step + 1)
        start_step = 0
        top1 = evaluate(model, test_x, test_y)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "test_top1": top1,
                        "seconds": time.time() - t0, "device": device.type})
        print(json.dumps(history[-1]), flush=True)
        save(epoch + 1, 0)
    weights = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"history": json.dumps(history), "model": args.model, "init_from": args.init_from or "none"}
    save_file(weights, str(out), metadata=metadata)
    model.load_state_dict({k: v.float().to(device) for k, v in weights.items()})
    print(f"wrote {out}; fp16 test top-1 {evaluate(model, test_x, test_y):.4f}; "
          f"train wall time {sum(h['seconds'] for h in history):.0f}s")


if __name__ == "__main__":
    main()
