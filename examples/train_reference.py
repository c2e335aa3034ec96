"""Train the embedded reference model ``vit_fmnist`` on Fashion-MNIST train (design.md §5).

Seeded and resumable: the full training state is saved to ``--state-dir`` after every epoch, and a rerun of
the same command continues from the last finished epoch. When training ends, the weights are written as
fp16 safetensors into the package (``vitcompress/weights/vit_fmnist.safetensors``) and the test-split
top-1 is printed. On CPU, bf16 autocast is used where the CPU supports it (about 2× faster here).

    python examples/train_reference.py --epochs 12
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitcompress.data import FMNIST_MEAN, FMNIST_STD, load_fmnist_arrays, normalize_uint8
from vitcompress.models import build_reference_architecture, reference_weights_path


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 28×28 crop of the 2-pixel zero-padded image and random horizontal flip, batched."""
    n = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None].expand(n, 28, 28)
    cols = (dx[:, None] + torch.arange(28))[:, None, :].expand(n, 28, 28)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, default=Path("checkpoints/train_reference"))
    parser.add_argument("--out", type=Path, default=reference_weights_path())
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 even where bf16 autocast works")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_x, train_y = load_fmnist_arrays("train")
    test_x, test_y = load_fmnist_arrays("test")
    model = build_reference_architecture()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, history = 0, []
    state_file = args.state_dir / "last.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start_epoch, history = state["epoch"], json.loads(state["history"])
        print(f"resumed after epoch {start_epoch}")
    use_bf16 = not args.no_bf16
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = normalize_uint8(augment(train_x[idx], generator), FMNIST_MEAN, FMNIST_STD)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running += loss.item()
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss.item():.4f}", flush=True)
        top1 = evaluate(model, test_x, test_y)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "test_top1": top1,
                        "seconds": time.time() - t0})
        print(json.dumps(history[-1]), flush=True)
        args.state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(),
                    "epoch": epoch + 1, "history": json.dumps(history)}, state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)
    weights = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out), metadata={"history": json.dumps(history)})
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    print(f"wrote {args.out}; fp16 test top-1 {evaluate(model, test_x, test_y):.4f}; "
          f"train wall time {sum(h['seconds'] for h in history):.0f}s")


if __name__ == "__main__":
    main()
