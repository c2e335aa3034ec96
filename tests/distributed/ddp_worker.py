"""Worker for tests/distributed/test_ddp.py, started by torchrun (or run alone): fine-tunes a tiny seeded ViT
for a few steps with the real fine-tune stage, then rank 0 writes the student's weights and the run's report.

Usage: ddp_worker.py OUT_DIR [finetune.key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import yaml
from safetensors.torch import save_file

from tests.stages.test_finetune import make_context
from vitcompress.stages import finetune
from vitcompress.training import distributed


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()


def main(out: Path, overrides: list[str]) -> None:
    teacher, student = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for p in student.blocks.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    images, labels = torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    config = {"steps": 4, "batch_size": 16, "lr": 1e-3, "workers": 0, "distill": {"tokens_mse": 0.5}}
    for item in overrides:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    ctx = make_context(teacher, student, images, labels, **config)
    ctx.dist = distributed.setup()
    try:
        finetune.run(ctx)
        distributed.check_identical(student, ctx.dist, "after the fine-tune")
    finally:
        distributed.teardown()
    if ctx.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / "student.safetensors"))
        (out / "finetune.json").write_text(ctx.report.finetune.model_dump_json())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
