"""The fine-tune at scale, in one process: mixed precision, DataLoader workers with unreadable images skipped,
token distillation, checkpoints that a resumed run continues from exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.stages.test_finetune import make_context, perturbed
from vitcompress.data import ImageDirectory
from vitcompress.errors import ResumeError
from vitcompress.stages import finetune
from vitcompress.training import checkpoint, loop


def test_bf16_autocast_trains_on_cpu_and_the_report_says_so(reference_model):
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student = perturbed(reference_model)
    seen = []
    hook = student.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ctx = make_context(reference_model, student, images, labels, steps=2, lr=1e-3, precision="bf16", workers=0)
    finetune.run(ctx)
    hook.remove()
    assert ctx.report.finetune.precision == "bf16" and ctx.report.finetune.steps_done == 2
    assert seen == [torch.bfloat16, torch.bfloat16], "the student's linears ran in bf16 under autocast"
    assert all(p.dtype == torch.float32 for p in student.parameters()), "the weights stay fp32"
    assert not torch.equal(student.blocks[0].attn.qkv.weight, reference_model.blocks[0].attn.qkv.weight)


def test_workers_skip_an_unreadable_image_and_count_it(tmp_path, reference_model, caplog):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png at all")
    data = ImageDirectory(tmp_path, lambda img: torch.from_numpy(np.asarray(img, np.float32) / 255)[None],
                          in_chans=1, class_index={"a": 0, "b": 1})
    ctx = make_context(reference_model, perturbed(reference_model), torch.zeros(1, 1, 28, 28), torch.zeros(1).long(),
                       steps=3, batch_size=13, workers=1)
    ctx.data.train = data  # 13 images: every step reads them all, the broken one included
    finetune.run(ctx)
    run = ctx.report.finetune.model_dump()
    assert run["workers"] == 1 and run["steps_done"] == 3 and run["skipped_images"] == 3
    assert sum("broken.png" in r.getMessage() for r in caplog.records) == 3


def test_tokens_mse_adds_the_final_token_distance(reference_model):
    config = make_context(reference_model, reference_model, torch.zeros(1, 1, 28, 28), torch.zeros(1).long(),
                          distill={"tokens_mse": 2.0, "logits_kl": 0.0, "labels_ce": 0.0}).recipe.finetune
    logits, tokens = torch.randn(4, 10), torch.randn(4, 50, 192)
    other = tokens + 0.5
    loss = loop.distill_loss(logits, logits, torch.full((4,), -1), config, other, tokens)
    torch.testing.assert_close(loss, torch.tensor(2.0 * 0.25))
    net = loop.TokensAndLogits(reference_model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats, out = net(x)
        torch.testing.assert_close(out, reference_model(x))
    assert feats.shape == (2, 50, 192)


def run_with_checkpoints(reference_model, directory, steps, resume=False, **extra):
    torch.manual_seed(0)
    images, labels = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    student = perturbed(reference_model)
    ctx = make_context(reference_model, student, images, labels, steps=steps, lr=1e-3, checkpoint_every=2,
                       workers=0, **extra)
    ctx.checkpoint_dir = directory
    ctx.settings.resume = resume
    finetune.run(ctx)
    return ctx, student


class StopAfter(Exception):
    pass


def test_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, reference_model, monkeypatch):
    """Stop a 7-step run after the step-4 checkpoint (across an epoch boundary: 48 images, batch 8), resume it:
    the same weights and losses as 7 steps in one go."""
    _, whole = run_with_checkpoints(reference_model, tmp_path / "a", 7)
    saved = []
    real_save = checkpoint.save

    def save_then_stop(directory, state):
        saved.append(state.step)
        real_save(directory, state)
        if state.step == 4:
            raise StopAfter

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(StopAfter):
        run_with_checkpoints(reference_model, tmp_path / "b", 7)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert saved == [2, 4] and checkpoint.load(tmp_path / "b").step == 4
    ctx, resumed = run_with_checkpoints(reference_model, tmp_path / "b", 7, resume=True)
    assert ctx.report.finetune.resumed_from_step == 4 and ctx.report.finetune.steps_done == 7
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_resume_refuses_another_recipe(tmp_path):
    identity = checkpoint.run_identity("finetune:\n  lr: 0.001\n", "vit_fmnist", None, False, "fmnist", 1)
    checkpoint.write_identity(tmp_path, identity)
    (tmp_path / checkpoint.LATEST_FILE).write_text('{"checkpoint": "x"}')
    checkpoint.check_resumable(tmp_path, identity)
    changed = {**identity, "recipe": "finetune:\n  lr: 0.01\n", "world_size": 2}
    with pytest.raises(ResumeError, match=r"recipe changed: 'lr: 0.001' → 'lr: 0.01'; world_size was 1, now 2"):
        checkpoint.check_resumable(tmp_path, changed)


def test_sigterm_saves_a_checkpoint_at_the_end_of_the_step_then_exits_143(tmp_path, reference_model):
    import os
    import signal

    student = perturbed(reference_model)
    calls = []

    def terminate_on_third_forward(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    student.blocks[0].register_forward_hook(terminate_on_third_forward)
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    ctx = make_context(reference_model, student, images, labels, steps=50, checkpoint_every=40, workers=0)
    ctx.checkpoint_dir = tmp_path
    with pytest.raises(SystemExit) as stopped:
        finetune.run(ctx)
    assert stopped.value.code == 143
    assert checkpoint.load(tmp_path).step == 3, "saved at the end of the step SIGTERM arrived in"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the previous handler is back"


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively():
    cpu = torch.device("cpu")
    assert loop.resolve_precision("auto", cpu, {"avx2", "avx512f", "avx512_bf16"}) == "bf16"
    assert loop.resolve_precision("auto", cpu, {"avx2", "amx_bf16", "amx_tile"}) == "bf16"
    assert loop.resolve_precision("auto", cpu, {"avx2", "avx512f", "avx512bw"}) == "fp32"
    assert loop.resolve_precision("auto", cpu, set()) == "fp32"
    assert loop.resolve_precision("fp16", cpu, {"avx512_bf16"}) == "fp16"
    assert loop.resolve_precision("fp32", cpu, {"avx512_bf16"}) == "fp32"
    assert loop.resolve_precision("auto", cpu) in ("bf16", "fp32")  # this machine's /proc/cpuinfo


def test_auto_precision_run_reports_what_it_resolved_to(reference_model):
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ctx = make_context(reference_model, perturbed(reference_model), images, labels, steps=1, precision="auto",
                       workers=0)
    finetune.run(ctx)
    assert ctx.report.finetune.precision == loop.resolve_precision("auto", torch.device("cpu"))
