import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from vitcompress.context import ConvertSettings, RunContext
from vitcompress.data import DataBundle
from vitcompress.errors import RecipeError
from vitcompress.models import LoadedModel
from vitcompress.progress import LogProgress
from vitcompress.recipe import parse_recipe
from vitcompress.stages import finetune
from vitcompress.training import loop


def make_context(teacher, student, images, labels, recipe_steps=(), **finetune_cfg) -> RunContext:
    finetune_cfg = {"batch_size": 8, "warmup_steps": 1, **finetune_cfg}
    recipe = parse_recipe({"steps": list(recipe_steps), "finetune": finetune_cfg}, "test")
    data = TensorDataset(images, labels)
    ctx = RunContext(settings=ConvertSettings(model="vit_fmnist", out_dir=Path("unused")), recipe=recipe,
                     work_dir=Path("unused"), scratch_dir=Path("unused"), progress=LogProgress())
    ctx.original = LoadedModel(teacher, "vit_fmnist", "test", {"input_size": (1, 28, 28)}, None)
    ctx.model = student
    ctx.data = DataBundle("test", data, data, labelled=True)
    return ctx


def perturbed(model, scale=0.05, seed=0):
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.blocks.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return student


def kl_to_teacher(student, teacher, images):
    with torch.no_grad():
        return torch.nn.functional.kl_div(student(images).log_softmax(-1), teacher(images).log_softmax(-1),
                                          log_target=True, reduction="batchmean").item()


def test_distillation_moves_student_towards_teacher(reference_model):
    torch.manual_seed(0)
    images = torch.randn(32, 1, 28, 28)
    labels = torch.full((32,), -1)
    student = perturbed(reference_model)
    before = kl_to_teacher(student, reference_model, images)
    ctx = make_context(reference_model, student, images, labels, steps=15, lr=1e-3)
    finetune.run(ctx)
    assert ctx.report.finetune.steps_done == 15 and ctx.report.finetune.stopped is None
    assert kl_to_teacher(student, reference_model, images) < 0.5 * before
    assert not student.training


def test_embeddings_frozen_by_default(reference_model):
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student = perturbed(reference_model)
    pos_embed = student.pos_embed.detach().clone()
    finetune.run(make_context(reference_model, student, images, labels, steps=2, lr=1e-2))
    torch.testing.assert_close(student.pos_embed, pos_embed)


def test_nan_guard_keeps_last_good_weights(reference_model):
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    images[:] = float("nan")
    student = perturbed(reference_model)
    weights = copy.deepcopy(student.state_dict())
    ctx = make_context(reference_model, student, images, labels, steps=5)
    finetune.run(ctx)
    assert ctx.report.finetune.steps_done == 0
    assert "non-finite" in ctx.report.finetune.stopped
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, weights[key], equal_nan=True)


def test_no_finetune_section_skips(reference_model):
    ctx = make_context(reference_model, reference_model, torch.zeros(8, 1, 28, 28), torch.zeros(8).long())
    ctx.recipe = parse_recipe({}, "test")
    finetune.run(ctx)
    assert ctx.report.finetune is None


def test_cosine_schedule_with_warmup():
    config = parse_recipe({"finetune": {"steps": 100, "warmup_steps": 10}}, "t").finetune
    factor = loop._schedule(config)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert abs(factor(55) - 0.5) < 1e-9 and factor(99) < 0.001


def test_auto_device_is_cpu_without_gpu_and_models_end_on_cpu(reference_model):
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student = perturbed(reference_model)
    ctx = make_context(reference_model, student, images, labels, steps=1)
    finetune.run(ctx)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ctx.report.finetune.device.startswith(expected)
    assert all(p.device.type == "cpu" for p in [*student.parameters(), *reference_model.parameters()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu_is_a_recipe_error(reference_model):
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ctx = make_context(reference_model, perturbed(reference_model), images, labels, steps=1, device="cuda")
    with pytest.raises(RecipeError, match="finetune.device: cuda was asked for"):
        finetune.run(ctx)


def test_staged_finetune_applies_each_group_then_trains_it(reference_model):
    """The transform stage leaves staged steps alone; stage 1 converts and tunes the attention, stage 2 adds the
    MoE, whose router then learns (from the task and the balance loss: the fine-tune adds every aux_loss)."""
    from vitcompress.layers.binary_attention import BinaryAttention
    from vitcompress.layers.moe_linear import MoELinear
    from vitcompress.stages import transform

    steps = [{"transform": "shiftadd_attention", "targets": ["blocks.0.attn"]},
             {"transform": "shiftadd_moe", "targets": ["blocks.0.mlp.fc1"], "latency_weights": [6, 4]}]
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student = copy.deepcopy(reference_model)
    ctx = make_context(reference_model, student, images, labels, recipe_steps=steps, steps=3, lr=1e-2,
                       stages=[["shiftadd_attention"], ["shiftadd_moe"]])
    transform.run(ctx)
    assert ctx.report.steps == [] and not isinstance(student.blocks[0].attn, BinaryAttention)
    torch.manual_seed(0)
    finetune.run(ctx)
    assert isinstance(student.blocks[0].attn, BinaryAttention) and isinstance(student.blocks[0].mlp.fc1, MoELinear)
    assert [s.transform for s in ctx.report.steps] == ["shiftadd_attention", "shiftadd_moe"]
    report = ctx.report.finetune.model_dump()
    assert [s["transforms"] for s in report["stages"]] == [["shiftadd_attention"], ["shiftadd_moe"]]
    assert report["steps_done"] == 6 and report["steps_budget"] == 6 and report["stopped"] is None
    fresh = MoELinear.from_linear(reference_model.blocks[0].mlp.fc1, levels=7)
    assert not torch.allclose(student.blocks[0].mlp.fc1.router.bias, fresh.router.bias), "the router trained"


def test_divergence_guard_restores_the_weights_from_before_the_run(reference_model):
    """lr 10 under AdamW: the loss stays finite but explodes; the guard stops and restores the start weights."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    student = perturbed(reference_model)
    weights = copy.deepcopy(student.state_dict())
    ctx = make_context(reference_model, student, images, labels, steps=30, lr=10.0, warmup_steps=0)
    finetune.run(ctx)
    run = ctx.report.finetune.model_dump()
    assert run["stopped"].startswith("diverged at step") and 0 < run["steps_done"] < 30
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, weights[key])


def test_divergence_guard_ignores_a_noisy_but_sound_run():
    guard = loop.DivergenceGuard(max_loss_ratio=10.0)
    norm = torch.tensor(1.0)
    losses = [0.01, 0.5, 0.02, 0.9, 0.3] + [0.05] * 20  # spikes above 10 × first, but under the 0.1 floor's limit
    assert all(guard.check(step, torch.tensor(loss), norm) is None for step, loss in enumerate(losses))
    assert guard.check(99, torch.tensor(float("inf")), norm)[1] is False
