"""``convert --model-arg NAME=VALUE``: timm.create_model arguments (a shallow copy for smoke tests), random init
only; with weights (a checkpoint, pretrained or embedded) or malformed it is one ``error:`` line, exit 2."""

import pytest
from click.testing import CliRunner

from vitcompress.cli import main
from vitcompress.errors import ModelError
from vitcompress.models import load_model


@pytest.mark.parametrize("args, expected", [
    (["test_vit", "--model-arg", "depth=2"], "--model-arg depth changes the architecture, which pretrained weights"),
    (["vit_fmnist", "--model-arg", "depth=2"], "which pretrained weights do not fit: use it with --random-init"),
    (["test_vit", "--model-arg", "depth=2", "--checkpoint", "w.safetensors"], "which --checkpoint do not fit"),
    (["test_vit", "--random-init", "--model-arg", "2"], "--model-arg '2': expected NAME=VALUE"),
])
def test_model_arg_with_weights_or_malformed_is_one_error_line(tmp_path, args, expected):
    result = CliRunner().invoke(main, ["convert", *args, "--recipe", "svd", "--out", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        result.output
    assert not (tmp_path / "out").exists()


def test_model_args_build_a_shallow_random_copy():
    loaded = load_model("vit_fmnist", random_init=True, model_args={"depth": 2})
    assert len(loaded.model.blocks) == 2 and "depth=2" in loaded.weights
    assert loaded.data_config["input_size"] == (1, 28, 28)
    with pytest.raises(ModelError, match="--model-arg dept=2 does not build test_vit"):
        load_model("test_vit", random_init=True, model_args={"dept": 2})


def test_an_image_size_argument_sets_the_input_size_the_data_is_made_at():
    loaded = load_model("deit_tiny_patch16_224", random_init=True, model_args={"depth": 1, "img_size": 160})
    assert loaded.data_config["input_size"] == (3, 160, 160)
    assert load_model("deit_tiny_patch16_224", random_init=True, model_args={"depth": 1}).data_config[
        "input_size"] == (3, 224, 224)
