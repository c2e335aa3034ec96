"""Hugging Face checkpoint directories: the timm model mapped from a transformers ``save_pretrained`` directory
computes transformers' own logits (random small configs, every parameter perturbed so tokens, layer scales and
biases all count), keeps ``id2label`` and the image processor's settings; a convert runs on the directory's
weights; a directory it cannot map, or whose weights are missing or broken, is one ``error:`` line, exit 2."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.test_cli import TINY_SVD, invoke, one_error_line
from vitcompress.errors import ModelError
from vitcompress.models import load_model

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=4)
NAMES = ["cat", "dog", "ship", "truck"]
#: name → (model class, config class, config extras, image processor class, its settings or None for none saved)
CASES = {
    "vit": ("ViTForImageClassification", "ViTConfig", {"intermediate_size": 96, "layer_norm_eps": 1e-12},
            "ViTImageProcessor", {"size": {"height": 32, "width": 32}, "resample": 2}),
    "deit": ("DeiTForImageClassification", "DeiTConfig", {"intermediate_size": 96, "hidden_act": "gelu_new"},
             None, None),
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {"intermediate_size": 128,
                       "qkv_bias": False}, "DeiTImageProcessor",
                       {"size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}}),
    # the processor crops 40×40 from a 48 short side: the 4×4 position grid is resampled to 5×5 as transformers does
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", {"mlp_ratio": 3, "layerscale_value": 0.1},
               "BitImageProcessor", {"size": {"shortest_edge": 48}, "crop_size": {"height": 40, "width": 40}}),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                         {"mlp_ratio": 2, "num_register_tokens": 2}, None, None),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name → (directory, the transformers model in eval mode) for every case, saved with ``save_pretrained``."""
    root, made = tmp_path_factory.mktemp("hf"), {}
    torch.manual_seed(0)
    for name, (model_cls, config_cls, extra, processor_cls, processor) in CASES.items():
        config = getattr(transformers, config_cls)(**SMALL, **extra, id2label=dict(enumerate(NAMES)))
        model = getattr(transformers, model_cls)(config).eval()
        with torch.no_grad():
            for param in model.parameters():  # zero-initialised tokens and unit layer scales would hide a bad map
                param.add_(torch.randn_like(param) * 0.2)
        model.save_pretrained(root / name)
        if processor_cls is not None:
            getattr(transformers, processor_cls)(**processor).save_pretrained(root / name)
        made[name] = (root / name, model)
    return made


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(hf_dirs, name):
    directory, reference = hf_dirs[name]
    loaded = load_model(str(directory))
    images = torch.randn(4, *loaded.data_config["input_size"])
    with torch.no_grad():
        want, got = reference(pixel_values=images).logits, loaded.model(images)
    assert got.shape == want.shape == (4, len(NAMES))
    assert (got - want).abs().max() < 1e-4 and torch.equal(got.argmax(1), want.argmax(1))
    assert loaded.class_names == NAMES and loaded.name == str(directory)
    assert loaded.weights.startswith(f"Hugging Face checkpoint {directory / 'model.safetensors'} ({CASES[name][0]}")


def test_preprocessing_from_the_image_processor(hf_dirs):
    vit, deit, distilled, dinov2 = (load_model(str(hf_dirs[n][0])).data_config
                                    for n in ("vit", "deit", "deit_distilled", "dinov2"))
    assert vit["input_size"] == (3, 32, 32) and vit["interpolation"] == "bilinear" and vit["crop_pct"] == 1.0
    assert vit["mean"] == vit["std"] == (0.5, 0.5, 0.5) and vit["crop_mode"] == "squash"
    assert distilled["crop_pct"] == pytest.approx(32 / 36) and distilled["interpolation"] == "bicubic"
    assert dinov2["input_size"] == (3, 40, 40) and dinov2["crop_pct"] == pytest.approx(40 / 48)
    assert dinov2["crop_mode"] == "center" and dinov2["mean"] == pytest.approx(transformers.BitImageProcessor().image_mean)
    assert deit["mean"] == pytest.approx((0.485, 0.456, 0.406)) and deit["crop_pct"] == 0.875, \
        "no preprocessor_config.json: DeiT's image processor defaults"


def test_bin_and_sharded_weights_load_the_same(hf_dirs, tmp_path):
    source = hf_dirs["vit"][0]
    want = load_model(str(source)).model.state_dict()
    state = load_file(source / "model.safetensors")
    binary, sharded = tmp_path / "bin", tmp_path / "sharded"
    for directory in (binary, sharded):
        shutil.copytree(source, directory)
        (directory / "model.safetensors").unlink()
    torch.save(state, binary / "pytorch_model.bin")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, sharded / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for directory, file in ((binary, "pytorch_model.bin"), (sharded, "model.safetensors.index.json")):
        loaded = load_model(str(directory))
        got = loaded.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert loaded.weights.startswith(f"Hugging Face checkpoint {directory / file} ")


def test_own_weights_only(hf_dirs):
    with pytest.raises(ModelError, match="leave out --checkpoint, --random-init and --model-arg"):
        load_model(str(hf_dirs["vit"][0]), random_init=True)


@pytest.mark.export
def test_convert_runs_on_the_directory_weights(hf_dirs, tmp_path):
    directory = hf_dirs["deit_distilled"][0]
    (tmp_path / "r.yaml").write_text(TINY_SVD)
    out = tmp_path / "out"
    result = invoke("convert", directory, "--recipe", tmp_path / "r.yaml", "--data", "synthetic", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["name"] == str(directory)
    assert report["model"]["weights"].startswith("Hugging Face checkpoint") and "random" not in report["model"]["weights"]
    assert (out / "labels.txt").read_text().split() == NAMES


def _broken_dir(tmp_path, hf_dirs, breakage: str):
    """A copy of the ViT directory broken one way."""
    directory = tmp_path / "broken"
    shutil.copytree(hf_dirs["vit"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    if breakage == "swin":
        config["architectures"], config["model_type"] = ["SwinForImageClassification"], "swin"
    elif breakage == "deeper":
        config["num_hidden_layers"] = 3
    elif breakage == "corrupt":
        (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    elif breakage == "missing":
        (directory / "model.safetensors").unlink()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("breakage, message", [
    ("swin", "Hugging Face checkpoint of SwinForImageClassification, which vitcompress cannot map to timm"),
    ("deeper", "the weights lack 12 tensors the config's architecture needs (e.g. timm's blocks.2.attn.proj.bias)"),
    ("corrupt", "model.safetensors cannot be read: SafetensorError"),
    ("missing", "has config.json but no weights"),
])
def test_unmappable_directory_is_one_error_line(tmp_path, hf_dirs, breakage, message):
    directory = _broken_dir(tmp_path, hf_dirs, breakage)
    out = tmp_path / "out"
    result = invoke("convert", directory, "--recipe", "svd", "--data", "synthetic", "--out", out)
    assert result.exit_code == 2 and message in result.output and one_error_line(result.output), result.output
    assert not out.exists()


def test_directory_without_config_is_named(tmp_path):
    result = invoke("convert", tmp_path, "--recipe", "svd", "--data", "synthetic", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "is a directory without config.json" in result.output
    assert one_error_line(result.output)
