"""recipes/fast.yaml (the bench's fastest accurate point) through the whole pipeline, on the reference model
and on a DeiT architecture."""

from pathlib import Path

import onnx
import pytest

from tests.conftest import FAST
from vitcompress.api import convert

FAST_RECIPE = Path(__file__).parent.parent / "recipes" / "fast.yaml"


@pytest.mark.slow
def test_fast_recipe_factors_every_block_linear_of_the_reference_model(tmp_path):
    report = convert("vit_fmnist", FAST_RECIPE, out_dir=tmp_path / "run", overrides=FAST).report
    modules = report.steps[0].modules
    assert len(modules) == 12 * 4 and {m.rsplit(".", 1)[1] for m in modules} == {"qkv", "proj", "fc1", "fc2"}
    models = report.validation.models
    assert models["original"].macs / models["converted"].macs > 4.5
    assert all(g.passed for g in report.validation.gates if g.gate == "max_abs_diff")
    # 64 images (one is 1.6 points) and 32 calibration images: a sanity bound only (bench: 10,000 images, 512
    # calibration images, 0.35 points below the original)
    assert models["converted"].top1 >= models["original"].top1 - 10
    graph = onnx.load(str(tmp_path / "run" / "model.onnx")).graph
    weight_axes = {i.name: len(i.dims) for i in graph.initializer}
    layers = [weight_axes[n.input[1]] for n in graph.node
              if n.op_type in ("MatMul", "Gemm") and n.input[1] in weight_axes]
    # per block: qkv's first factor, the absorbed attention's scores and values (every head side by side),
    # proj's second factor and both MLP factor pairs, all 2-D; the classifier head is the one more layer
    assert layers == [2] * (12 * 8 + 1), layers


@pytest.mark.slow
def test_fast_recipe_on_a_deit_architecture(tmp_path):
    report = convert("deit_t", FAST_RECIPE, out_dir=tmp_path / "run", random_init=True,
                     overrides=[*FAST, "validate.max_top1_drop=null", "validate.min_agreement=null"]).report
    assert len(report.steps[0].modules) == 12 * 4
    assert [g.gate for g in report.validation.gates if g.passed] == ["max_abs_diff"]
    models = report.validation.models
    assert models["original"].macs / models["converted"].macs > 3
