"""The Python API: ``vitcompress.apply`` (steps in place) and ``vitcompress.convert`` (the pipeline), including
every bad input the notebook user can give."""

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vitcompress
from vitcompress.cli import main
from vitcompress.errors import DataError, ModelError, RecipeError, TargetError
from vitcompress.layers.lowrank_linear import LowRankLinear
from vitcompress.layers.skip import SkippedBlock
from vitcompress.layers.taylor_attention import TaylorAttention
from vitcompress.recipe import Recipe, dump_recipe, load_recipe, parse_recipe
from vitcompress.transforms import registry

RECIPES = Path(__file__).parent.parent / "recipes"
QUICK = {"calibration": {"images": 16, "batch_size": 8}, "finetune": {"steps": 2, "batch_size": 8},
         "validate": {"images": 16, "latency_runs": 3, "warmup_runs": 1, "profile_runs": 0}}


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    """A 3-block ViT on 28×28 grey images with a pretrained_cfg, as a user would hold one."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                              num_heads=2)
    model.pretrained_cfg = {"architecture": "tiny_vit", "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,),
                            "label_names": [f"class {i}" for i in range(10)]}
    return model.eval()


def images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def labelled(n: int = 48) -> TensorDataset:
    return TensorDataset(images(n), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------------------------ apply


def test_apply_with_a_default_config_converts_every_attention_in_place(reference_model):
    model = copy.deepcopy(reference_model)
    assert vitcompress.apply(model, vitcompress.TaylorConfig()) is model
    assert all(isinstance(block.attn, TaylorAttention) for block in model.blocks)
    assert not any(isinstance(m, Attention) for m in model.modules())
    assert not any(m.training for m in model.modules()), "new layers follow the model's eval mode"


def test_default_targets_of_the_mlp_transforms_are_both_block_linears(reference_model):
    model = copy.deepcopy(reference_model).train()
    vitcompress.apply(model, [vitcompress.ShiftConfig(), vitcompress.BinaryAttentionConfig()])
    assert {type(b.mlp.fc1).__name__ for b in model.blocks} == {type(b.mlp.fc2).__name__ for b in model.blocks} \
        == {"ShiftLinear"}
    assert {type(b.attn).__name__ for b in model.blocks} == {"BinaryAttention"}
    assert all(m.training for m in model.modules()), "a model in training mode stays in it"


def test_every_config_defaults_transform_to_its_registered_name_and_round_trips():
    for name, transform in registry.available().items():
        assert transform.config.model_fields["transform"].default == name
    recipe = Recipe(steps=[vitcompress.TaylorConfig(), vitcompress.LowRankConfig(rank=8),
                           vitcompress.SkipConfig(blocks=[1]), vitcompress.MoEConfig(latency_weights=[6, 4])])
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe)), "dumped") == recipe


def calibration_forms():
    x = images()
    return {
        "dataset": TensorDataset(x, torch.zeros(len(x))),
        "loader of (images, labels)": DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=8),
        "list of batches": list(x.split(8)),
        "one-shot generator": (batch for batch in x.split(8)),
        "function": lambda: x.split(8),
        "image tensor": x,
    }


@pytest.mark.parametrize("form", list(calibration_forms()))
def test_calibration_forms_give_the_same_cka_choice(tiny_vit, form):
    """The greedy CKA search reads the calibration images once per round: every form must give them all again."""
    step = vitcompress.SkipConfig(select="cka", count=2)
    want = vitcompress.apply_recipe(copy.deepcopy(tiny_vit), step, lambda: images().split(8))
    model = copy.deepcopy(tiny_vit)
    assert vitcompress.apply_recipe(model, step, calibration_forms()[form]) == want
    assert sum(isinstance(b, SkippedBlock) for b in model.blocks) == 2


def test_apply_a_recipe_file_with_calibration(tiny_vit, tiny_recipe):
    path = tiny_recipe("steps:\n  - {transform: svd_lowrank, rank_ratio: 0.25, whitening: pca}\n"
                       "calibration: {images: 16, batch_size: 8}\n")
    model = vitcompress.apply(tiny_vit, str(path), calibration=TensorDataset(images()))
    assert model is tiny_vit and sum(isinstance(m, LowRankLinear) for m in model.modules()) == 6


def test_apply_targets_matching_nothing_is_a_target_error(reference_model):
    model = copy.deepcopy(reference_model)
    with pytest.raises(TargetError, match="'blocks.\\*.attention' matches no module"):
        vitcompress.apply(model, vitcompress.TaylorConfig(targets=["blocks.*.attention"]))
    with pytest.raises(TargetError, match="matches no module"):
        vitcompress.apply(nn.Sequential(nn.Linear(4, 4)), vitcompress.LowRankConfig(rank=1))


def test_apply_a_cascade_recipe_is_a_recipe_error(reference_model):
    model = copy.deepcopy(reference_model)
    with pytest.raises(RecipeError, match="cascade recipe.*vitcompress.convert"):
        vitcompress.apply(model, RECIPES / "cascade.yaml")
    assert not any(isinstance(b, SkippedBlock) for b in model.blocks)
    low = load_recipe(RECIPES / "cascade.yaml").cascade.low
    vitcompress.apply(model, low, calibration=images())
    assert sum(isinstance(b, SkippedBlock) for b in model.blocks) == 6


def test_a_step_that_calibrates_without_calibration_is_a_data_error(reference_model):
    model = copy.deepcopy(reference_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=r"step 0 \(svd_lowrank\) needs calibration images") as caught:
        vitcompress.apply(model, vitcompress.LowRankConfig(rank_ratio=0.25, whitening="cholesky"))
    assert not isinstance(caught.value, ValueError)
    assert model.state_dict().keys() == before.keys(), "the model is left as it was"
    with pytest.raises(DataError, match="holds no images"):
        vitcompress.apply(model, vitcompress.SkipConfig(select="cka", count=1), calibration=[])


def test_apply_refuses_what_is_not_a_transform_config(reference_model):
    with pytest.raises(RecipeError, match="step 1: expected a transform config.*got dict"):
        vitcompress.apply(reference_model, [vitcompress.TaylorConfig(), {"transform": "taylor_attention"}])


def test_import_stays_light_and_exports_the_api():
    code = ("import sys, vitcompress; assert 'torch' not in sys.modules; import vitcompress.report; "
            "assert 'torch' not in sys.modules; print(sorted(vitcompress.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("apply", "convert", "load_recipe", "Report", "ConvertResult", "LowRankConfig", "TaylorConfig",
                 "BinaryAttentionConfig", "ShiftConfig", "MoEConfig", "SkipConfig"):
        assert repr(name) in out and getattr(vitcompress, name) is not None


# ---------------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("module", [nn.Linear(4, 4), nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())])
def test_convert_a_module_that_is_not_a_vit_is_a_model_error_and_writes_nothing(tmp_path, monkeypatch, module):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    recipe = parse_recipe({"steps": [{"transform": "taylor_attention"}], **QUICK}, "test")
    with pytest.raises(ModelError, match="timm VisionTransformer.*got torch.nn.modules"):
        vitcompress.convert(module, recipe, out_dir=tmp_path / "out", data=labelled())
    with pytest.raises(ModelError, match="timm VisionTransformer"):
        vitcompress.convert(module, recipe, data=labelled())
    assert list(tmp_path.iterdir()) == []


def assert_timings(report, out_dir: Path) -> None:
    """Every stage timed once in order, the parts within their stage, the stages within the total; the step's
    calibration pass within the step; report.json rewritten with them and still listed right in SHA256SUMS."""
    from vitcompress.api import STAGES
    from vitcompress.deploy.bundle import check_checksums

    timings = report.timings
    assert [stage.stage for stage in timings.stages] == [module.__name__.rpartition(".")[2] for module in STAGES]
    assert all(stage.seconds >= 0 for stage in timings.stages)
    assert sum(stage.seconds for stage in timings.stages) <= timings.seconds
    assert all(sum(part.seconds for part in stage.parts) <= stage.seconds + 1e-6 for stage in timings.stages)
    stages = {stage.stage: stage for stage in timings.stages}
    step = report.steps[0]
    assert 0 < step.calibration_seconds <= step.seconds <= stages["transform"].seconds
    assert [part.name for part in stages["validate"].parts] == [
        "accuracy", "parity (torch)", "latency", "params, MACs, expert shares"]
    assert stages["export"].parts[0].name == "original" and "step 0 svd_lowrank" in {
        part.name for part in stages["transform"].parts}
    assert "- wall time (seconds per stage): " in (out_dir / "report.md").read_text()
    assert "report.json" in check_checksums(out_dir)


@pytest.mark.slow
def test_convert_an_in_memory_vit_into_a_temporary_directory(tiny_vit):
    state = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    types = [type(m) for m in tiny_vit.modules()]
    grads = [p.requires_grad for p in tiny_vit.parameters()]
    recipe = parse_recipe({"steps": [{"transform": "svd_lowrank", "rank_ratio": 0.25, "whitening": "pca"}],
                           **QUICK}, "test")
    result = vitcompress.convert(tiny_vit, recipe, data=labelled())
    try:
        assert result.out_dir.parent == Path(tempfile.gettempdir())
        assert result.onnx_path == result.out_dir / "model.onnx"
        assert {p.name for p in result.out_dir.iterdir()} == {
            "model.onnx", "model.safetensors", "recipe.resolved.yaml", "report.json", "report.md", "preprocess.json",
            "labels.txt", "golden", "inference.json", "predict.py", "requirements.txt", "SHA256SUMS", "report.html",
            "predictions.npz", *(["report"] if result.report.explain.shown else [])}
        assert sum(isinstance(m, LowRankLinear) for m in result.model.modules()) == 6
        report = result.report
        assert (report.model.name, report.model.weights, report.model.source) == (
            "tiny_vit", "in-memory module", "argument")
        assert report.data.labelled and report.data.train_images == 48 and report.validation.images == 16
        assert report.validation.models["converted"].latency[1].p50_ms > 0
        assert report.schema_version == 1 and vitcompress.Report.load(result.out_dir / "report.json") == report
        assert_timings(report, result.out_dir)
    finally:
        import shutil

        shutil.rmtree(result.out_dir)
    assert types == [type(m) for m in tiny_vit.modules()] and not tiny_vit.training
    assert grads == [p.requires_grad for p in tiny_vit.parameters()]
    assert all(torch.equal(state[k], v) for k, v in tiny_vit.state_dict().items())


@pytest.mark.slow
def test_convert_a_recipe_model_with_unlabelled_images_records_the_source(tmp_path, tiny_recipe):
    path = tiny_recipe(yaml.safe_dump({"model": "test_vit", "steps": [{"transform": "taylor_attention"}],
                                       **{**QUICK, "finetune": None}}))
    result = vitcompress.convert(None, path, data=torch.utils.data.TensorDataset(torch.randn(8, 3, 160, 160)),
                                 random_init=True, out_dir=tmp_path / "run")
    assert result.out_dir == tmp_path / "run" and result.report.model.source == "recipe"
    assert not result.report.data.labelled and result.report.validation.models["converted"].top1 is None
    cli = CliRunner().invoke(main, ["convert", "--recipe", str(path), "--random-init", "--data",
                                                   "synthetic", "--out", str(tmp_path / "cli")],
                             catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    assert "test_vit: original vs converted" in cli.stdout and "ORT latency b1" in cli.stdout
    assert vitcompress.Report.load(tmp_path / "cli").model.source == "recipe"
