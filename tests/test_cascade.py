"""The entropy cascade: threshold calibration, the onnxruntime runner, `vitcompress predict`, the recipe section."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.deploy.bundle import verify
from vitcompress.deploy.runtime import CASCADE_FILE, Cascade, calibrate_threshold, preprocessing_metadata
from vitcompress.errors import RecipeError
from vitcompress.export import export_onnx
from vitcompress.layers.entropy import WithEntropy, softmax_entropy
from vitcompress.layers.skip import SkippedBlock
from vitcompress.models import REFERENCE_CFG
from vitcompress.recipe import load_recipe, parse_recipe


@pytest.mark.parametrize("n", [1, 7, 100, 1001])
def test_threshold_hits_the_fraction_within_one_sample(n):
    entropies = np.random.default_rng(n).gamma(2.0, 0.3, n).astype(np.float32)
    for fraction in (0.01, 0.1, 0.5, 0.7, 0.9, 0.999, 1.0):
        early = (entropies.astype(np.float64) <= calibrate_threshold(entropies, fraction)).sum()
        assert abs(early - fraction * n) <= 1, (fraction, early)


def test_threshold_with_ties_takes_the_nearest_achievable_count():
    entropies = np.concatenate([np.zeros(30), np.linspace(0.1, 2, 70)]).astype(np.float32)
    assert (entropies <= calibrate_threshold(entropies, 0.1)).sum() == 30, "the 30 tied zeros exit together"
    assert (entropies <= calibrate_threshold(entropies, 0.5)).sum() == 50
    with pytest.raises(ValueError):
        calibrate_threshold(entropies, 0.0)


def test_entropy_is_shannon_in_nats():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    p = logits.softmax(-1)
    expected = -(p * p.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(softmax_entropy(logits), expected)
    assert softmax_entropy(logits)[0].item() == pytest.approx(np.log(4))


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    """A cascade of two small real ViTs on 28×28 images: low = high with its middle block's attention skipped."""
    torch.manual_seed(0)
    high = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                             num_heads=2).eval()
    low = copy.deepcopy(high)
    low.blocks[1] = SkippedBlock.from_block(low.blocks[1])
    directory = tmp_path_factory.mktemp("cascade")
    meta = preprocessing_metadata(REFERENCE_CFG, list(REFERENCE_CFG["label_names"]))
    for name, model in (("low", low), ("high", high)):
        export_onnx(WithEntropy(model), directory / f"{name}.onnx", input_size=(1, 28, 28), metadata=meta,
                    output_names=("logits", "entropy"))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        threshold = calibrate_threshold(softmax_entropy(low(x)).numpy(), 0.5)
    (directory / CASCADE_FILE).write_text(json.dumps({"low": "low.onnx", "high": "high.onnx", "threshold": threshold}))
    return directory, low, high


class Recording:
    """An onnxruntime session that records the batches it is asked to run."""

    def __init__(self, session):
        self.session, self.inputs = session, []

    def run(self, names, feeds):
        self.inputs.append(feeds["input"].copy())
        return self.session.run(names, feeds)


def test_runner_sends_only_uncertain_inputs_to_the_high_model(cascade_dir):
    directory, low, high = cascade_dir
    cascade = Cascade(directory, threads=1)
    cascade.high = Recording(cascade.high)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    result = cascade.predict(x.numpy())
    with torch.no_grad():
        low_logits, entropy = low(x), softmax_entropy(low(x))
        high_logits = high(x)
    uncertain = entropy.numpy().astype(np.float64) > cascade.threshold
    assert 0 < uncertain.sum() < 32, "the check needs inputs on both sides of the threshold"
    np.testing.assert_array_equal(result.early, ~uncertain)
    assert len(cascade.high.inputs) == 1
    np.testing.assert_array_equal(cascade.high.inputs[0], x.numpy()[uncertain])
    np.testing.assert_allclose(result.logits[~uncertain], low_logits.numpy()[~uncertain], atol=1e-4)
    np.testing.assert_allclose(result.logits[uncertain], high_logits.numpy()[uncertain], atol=1e-4)
    confident = x.numpy()[~uncertain]
    cascade.predict(confident)
    assert len(cascade.high.inputs) == 1, "a batch below the threshold must never touch the high model"


def test_predict_command(cascade_dir, tmp_path):
    directory, _, _ = cascade_dir
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f"{i}.png")
    result = CliRunner().invoke(main, ["predict", str(images), "--cascade", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [p["image"] for p in out["predictions"]] == [str(images / f"{i}.png") for i in range(3)]
    assert all(p["model"] in ("low", "high") and p["name"] in REFERENCE_CFG["label_names"] for p in out["predictions"])
    assert all((p["model"] == "low") == (p["entropy"] <= out["threshold"]) for p in out["predictions"])
    table = CliRunner().invoke(main, ["predict", str(images / "0.png"), "--cascade", str(directory)])
    assert table.exit_code == 0 and "exited at the low-effort model" in table.output


@pytest.mark.parametrize("args, message", [
    (["{images}", "--cascade", "{tmp}"], "is not a cascade directory"),
    (["{tmp}/none.png", "--cascade", "{cascade}"], "does not exist"),
    (["{tmp}/bad.png", "--cascade", "{cascade}"], "cannot be read"),
])
def test_predict_bad_input(cascade_dir, tmp_path, args, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    args = [a.format(tmp=tmp_path, cascade=cascade_dir[0], images=tmp_path / "bad.png") for a in args]
    result = CliRunner().invoke(main, ["predict", *args])
    assert result.exit_code == 2 and message in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.output


LOW = [{"transform": "attention_skip", "blocks": [1]}]


@pytest.mark.parametrize("data, message", [
    ({"steps": LOW, "cascade": {"low": LOW}}, "with cascade, give the steps as cascade.low"),
    ({"cascade": {"low": [{"transform": "attention_skip", "blocks": [1], "colour": 1}]}},
     r"cascade\.low\.0\.colour: unknown key"),
    ({"cascade": {"low": LOW, "high": "teacher"}}, r"cascade\.high\.0: each step is a mapping|cascade\.high: must be"),
    ({"cascade": {"low": LOW, "low_effort_fraction": 1.5}}, r"cascade\.low_effort_fraction"),
    ({"cascade": {"low": []}}, r"cascade\.low: .*at least 1"),
    ({"cascade": {"high": "original"}}, r"cascade\.low: Field required"),
])
def test_cascade_recipe_errors(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, "test.yaml")


def test_shipped_cascade_recipe():
    recipe = load_recipe("recipes/cascade.yaml")
    assert recipe.steps == [] and recipe.model_steps == recipe.cascade.low
    assert recipe.cascade.high == "original" and recipe.cascade.low_effort_fraction == 0.7


@pytest.mark.slow
def test_cascade_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "convert", "vit_fmnist", "--recipe", "recipes/cascade.yaml", "--out", str(out), "--json",
        *[x for item in FAST + ["finetune.steps=2", "validate.batch_sizes=[1]",
                                "cascade.high=[{transform: attention_skip, blocks: [0]}]"] for x in ("--set", item)]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"low.onnx", "high.onnx", "cascade.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    c = report["cascade"]
    assert abs(c["early_fraction"] * 64 - 0.7 * 64) <= 1 and c["images"] == 64
    assert [p["low_effort_fraction"] for p in c["sweep"]] == [0.5, 0.7, 0.9]
    assert c["high"]["finetune"]["steps_done"] == 2 and c["high"]["steps"][0]["modules"] == ["blocks.0"]
    b1 = c["expected_ms"]["b1"]
    assert b1["cascade"] == pytest.approx(c["latency"]["low"]["b1"]["p50_ms"]
                                          + (1 - c["early_fraction"]) * c["latency"]["high"]["b1"]["p50_ms"])
    rounds = report["steps"][0]["details"]["rounds"]
    assert len(rounds) == 6 and len(rounds[0]["cka"]) == 12
    cascade = Cascade(out)
    assert cascade.threshold == c["threshold"] and cascade.class_names[5] == "sandal"
    verification = verify(out)  # the bundle: golden logits of all three models, Fashion-MNIST images as PNG
    assert verification.ok, verification.as_dict()
    assert {"golden low.onnx", "golden high.onnx", "preprocessing"} <= {check.name for check in verification.checks}
