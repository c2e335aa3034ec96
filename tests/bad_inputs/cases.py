"""Bad inputs that are built, not stored: checkpoints, images, data directories, ONNX files, argument lists.

Each :class:`Case` writes what it needs into a fresh directory (``setup``), then runs the CLI with ``args``, in
which ``{tmp}`` is that directory, ``{ok}`` a valid cheap recipe, ``{cascade}`` a valid cascade directory and
``{bundle}`` a valid convert bundle (the cascade directory, which holds a ``model.onnx`` too). The command
must end with one ``error:`` line containing ``expect``,
exit code 2, and write nothing. (Stored recipe files are in ``recipes/``, each naming its expected message.)
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

MARKER = "pickle-code-ran"


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    expect: str
    setup: Callable[[Path], None] | None = None


def test_vit_state(**kwargs) -> dict[str, torch.Tensor]:
    return timm.create_model("test_vit", pretrained=False, **kwargs).state_dict()


def write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(content)


def safetensors_file(name: str, state: Callable[[], dict], cut: int | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state().items()}, str(tmp / name))
        if cut is not None:
            (tmp / name).write_bytes((tmp / name).read_bytes()[:cut])
    return setup


class RunsCode:
    """A pickle that would create a marker file when unpickled with weights_only=False."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / MARKER)

    def __reduce__(self):
        return (open, (self.path, "w"))


def code_pickle(tmp: Path) -> None:
    torch.save({"state_dict": RunsCode(tmp)}, tmp / "evil.pth")


def nan_weights() -> dict[str, torch.Tensor]:
    state = test_vit_state()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    return state


def headless() -> dict[str, torch.Tensor]:
    return {k: v for k, v in test_vit_state().items() if not k.startswith("head.")}


def image(name: str, make: Callable[[], Image.Image], fmt: str | None = None) -> Callable[[Path], None]:
    return lambda tmp: make().save(tmp / name, fmt)


def truncated_jpeg(tmp: Path) -> None:
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp / "cut.jpg")
    (tmp / "cut.jpg").write_bytes((tmp / "cut.jpg").read_bytes()[:300])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(tmp: Path) -> None:
    """A 100 kB-pixel-per-byte PNG header: 20000 × 20000 pixels, over Pillow's MAX_IMAGE_PIXELS × 2."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
    (tmp / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IEND", b""))


def image_dir(classes: list[str], files: int = 2, junk: bool = False) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for name in classes:
            (tmp / "data" / name).mkdir(parents=True)
            for i in range(files):
                if junk:
                    (tmp / "data" / name / f"{i}.txt").write_text("not an image")
                else:
                    Image.new("RGB", (48, 40), (i * 60, 90, 20)).save(tmp / "data" / name / f"{i}.png")
    return setup


def symlink_loop(tmp: Path) -> None:
    (tmp / "data" / "n01440764").mkdir(parents=True)
    (tmp / "data" / "n01440764" / "loop").symlink_to(tmp / "data" / "n01440764", target_is_directory=True)


def copy_cascade(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """``change`` applied to ``tmp/c``, where the runner copies the valid cascade directory for every case that
    names ``{tmp}/c``."""
    return lambda tmp: change(tmp / "c")


def cascade_json(text: str) -> Callable[[Path], None]:
    return copy_cascade(lambda c: (c / "cascade.json").write_text(text))


def two_input_onnx(tmp: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3, "h", "w"]) for n in ("a", "b")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["logits"])], "g", inputs, [out])
    (tmp / "bundle").mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                    str(tmp / "bundle" / "model.onnx"))


def dynamic_size_onnx(tmp: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [out])
    (tmp / "bundle").mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                    str(tmp / "bundle" / "model.onnx"))


CONVERT = ["convert", "test_vit", "--recipe", "{ok}", "--out", "{tmp}/out"]
RANDOM = [*CONVERT, "--random-init"]
PREDICT = ["predict", "--cascade", "{cascade}"]

CASES = [
    # --set overrides
    Case("set-no-equals", [*RANDOM, "--set", "finetune.steps"], "expected key.path=value"),
    Case("set-empty-key", [*RANDOM, "--set", "=5"], "expected key.path=value"),
    Case("set-empty-part", [*RANDOM, "--set", "validate..threads=2"], "expected key.path=value"),
    Case("set-no-list-item", [*RANDOM, "--set", "steps.5.rank=3"], "no list item 5"),
    Case("set-wrong-type", [*RANDOM, "--set", "validate.threads=many"], "validate.threads"),
    Case("set-out-of-range", [*RANDOM, "--set", "validate.threads=-1"], "validate.threads"),
    Case("set-into-scalar", [*RANDOM, "--set", "validate.images.x=1"], "is not a mapping or list"),
    Case("set-bad-yaml", [*RANDOM, "--set", "steps.0.targets=[unclosed"], "value is not valid YAML"),
    Case("set-unknown-key", [*RANDOM, "--set", "validate.gates=1"], "validate.gates: unknown key"),
    # checkpoints
    Case("checkpoint-missing", [*CONVERT, "--checkpoint", "{tmp}/none.safetensors"], "does not exist"),
    Case("checkpoint-garbage", [*CONVERT, "--checkpoint", "{tmp}/garbage.safetensors"], "cannot be read",
         write("garbage.safetensors", b"\x00" * 64)),
    Case("checkpoint-truncated", [*CONVERT, "--checkpoint", "{tmp}/cut.safetensors"], "cannot be read",
         safetensors_file("cut.safetensors", test_vit_state, cut=4000)),
    Case("checkpoint-empty-pth", [*CONVERT, "--checkpoint", "{tmp}/empty.pth"], "cannot be read",
         write("empty.pth", b"")),
    Case("checkpoint-pickle-runs-code", [*CONVERT, "--checkpoint", "{tmp}/evil.pth"], "cannot be read", code_pickle),
    Case("checkpoint-other-architecture", [*CONVERT, "--checkpoint", "{tmp}/other.safetensors"],
         "is for another architecture", safetensors_file("other.safetensors", lambda: {
             k: v for k, v in timm.create_model("test_vit2").state_dict().items()})),
    Case("checkpoint-no-head", [*CONVERT, "--checkpoint", "{tmp}/headless.safetensors"], "missing keys",
         safetensors_file("headless.safetensors", headless)),
    Case("checkpoint-nan", [*CONVERT, "--checkpoint", "{tmp}/nan.safetensors"], "NaN or infinite values",
         safetensors_file("nan.safetensors", nan_weights)),
    Case("checkpoint-jax-npz", [*CONVERT, "--checkpoint", "{tmp}/jax.npz"], "cannot be read",
         lambda tmp: np.savez(tmp / "jax.npz", embedding=np.zeros((3, 3)))),
    Case("checkpoint-not-tensors", [*CONVERT, "--checkpoint", "{tmp}/list.pth"], "holds no state dict",
         lambda tmp: torch.save([1, 2, 3], tmp / "list.pth")),
    Case("checkpoint-and-random-init", [*CONVERT, "--random-init", "--checkpoint", "{tmp}/x.safetensors"],
         "exclude each other", safetensors_file("x.safetensors", test_vit_state)),
    # images, through predict (onnxruntime only)
    Case("image-corrupt", [*PREDICT, "{tmp}/bad.png"], "bad.png cannot be read", write("bad.png", b"\x89PNG junk")),
    Case("image-zero-bytes", [*PREDICT, "{tmp}/zero.jpg"], "zero.jpg cannot be read", write("zero.jpg", b"")),
    Case("image-truncated-jpeg", [*PREDICT, "{tmp}/cut.jpg"], "cut.jpg cannot be read", truncated_jpeg),
    Case("image-decompression-bomb", [*PREDICT, "{tmp}/bomb.png"], "bomb.png cannot be read", decompression_bomb),
    Case("image-missing", [*PREDICT, "{tmp}/nothing.png"], "does not exist"),
    Case("image-dir-without-images", [*PREDICT, "{tmp}"], "holds no images", write("notes.txt", b"text")),
    # data directories, through convert
    Case("data-missing", [*RANDOM, "--data", "{tmp}/nowhere"], "not a directory"),
    Case("data-missing-new-out-parents", ["convert", "test_vit", "--random-init", "--recipe", "{ok}", "--out",
                                          "{tmp}/new/deeper/out", "--data", "{tmp}/nowhere"], "not a directory"),
    Case("data-empty", [*RANDOM, "--data", "{tmp}/data"], "holds no images", lambda t: (t / "data").mkdir()),
    Case("data-no-image-files", [*RANDOM, "--data", "{tmp}/data"], "holds no images",
         image_dir(["n01440764"], junk=True)),
    Case("data-unknown-class", [*RANDOM, "--data", "{tmp}/data"], "match none of the model's 1000 classes",
         image_dir(["cats"])),
    Case("data-more-folders-than-classes", [*RANDOM, "--data", "{tmp}/data"], "1 of 3 class folders",
         image_dir(["0", "1", "1000"])),
    Case("data-val-only", [*RANDOM, "--data", "{tmp}/data"], "has val/ but no train/",
         image_dir(["val/n01440764"])),
    Case("data-class-too-small-to-split", [*RANDOM, "--data", "{tmp}/data"],
         "class folder 'n01440764' has 1 image, too few for a held-out split", image_dir(["n01440764"], files=1)),
    Case("data-symlink-loop", [*RANDOM, "--data", "{tmp}/data"], "holds no images", symlink_loop),
    Case("data-fmnist-for-rgb-model", [*RANDOM, "--data", "fmnist"], "--data fmnist needs a 1×28×28 model input"),
    # ONNX files for predict and profile
    Case("profile-no-bundle", ["profile", "{tmp}/none"], "is not a directory"),
    Case("profile-no-model", ["profile", "{tmp}"], "has no model.onnx"),
    Case("profile-truncated-onnx", ["profile", "{tmp}/bundle"], "does not load in onnxruntime",
         lambda t: ((t / "bundle").mkdir(), (t / "bundle" / "model.onnx").write_bytes(b"\x08\x07\x12\x03abc"))),
    Case("profile-two-inputs", ["profile", "{tmp}/bundle"], "inputs", two_input_onnx),
    Case("profile-dynamic-image-size", ["profile", "{tmp}/bundle"], "not fixed past the batch axis",
         dynamic_size_onnx),
    Case("profile-baseline-missing", ["profile", "{bundle}", "--baseline", "{tmp}/none.onnx"], "does not exist"),
    Case("predict-not-a-cascade", ["predict", "--cascade", "{tmp}", "{tmp}/x.png"], "is not a cascade directory",
         image("x.png", lambda: Image.new("RGB", (8, 8)))),
    Case("predict-cascade-json-garbage", ["predict", "--cascade", "{tmp}/c", "{cascade}/0.png"],
         "is not a valid cascade file", cascade_json("{not json")),
    Case("predict-cascade-json-missing-key", ["predict", "--cascade", "{tmp}/c", "{cascade}/0.png"],
         "is not a valid cascade file", cascade_json(json.dumps({"low": "low.onnx", "high": "high.onnx"}))),
    Case("predict-cascade-names-missing-file", ["predict", "--cascade", "{tmp}/c", "{cascade}/0.png"],
         "does not exist", cascade_json(json.dumps({"low": "gone.onnx", "high": "high.onnx", "threshold": 1}))),
    Case("predict-truncated-low", ["predict", "--cascade", "{tmp}/c", "{cascade}/0.png"],
         "does not load in onnxruntime", copy_cascade(lambda c: (c / "low.onnx").write_bytes(b"\x08\x07"))),
    Case("predict-plain-model-as-low", ["predict", "--cascade", "{tmp}/c", "{cascade}/0.png"],
         "is not a cascade model", copy_cascade(lambda c: shutil.copy(c / "model.onnx", c / "low.onnx"))),
    # arguments
    Case("unknown-model", ["convert", "deit_huge", "--recipe", "{ok}", "--out", "{tmp}/out"], "unknown model"),
    Case("recipe-missing", ["convert", "test_vit", "--random-init", "--recipe", "{tmp}/none.yaml", "--out", "{tmp}/out"],
         "none.yaml"),
    Case("out-exists", [*RANDOM], "exists: pass --force", lambda t: (t / "out").mkdir()),
    Case("out-is-a-file", [*RANDOM, "--force"], "is not a directory", write("out", b"a file")),
    Case("bad-number", ["profile", "{bundle}", "--runs", "0"], "Invalid value for '--runs'"),
    Case("not-a-number", ["profile", "{bundle}", "--threads", "two"], "Invalid value for '--threads'"),
    Case("unknown-option", ["convert", "test_vit", "--recipe", "{ok}", "--fast"], "No such option"),
    Case("unknown-command", ["compress", "test_vit"], "No such command"),
    Case("missing-recipe-option", ["convert", "test_vit"], "Missing option '--recipe'"),
    Case("predict-without-images", ["predict", "--cascade", "{cascade}"], "at least one IMAGE"),
    Case("recipe-10-mb", ["convert", "test_vit", "--random-init", "--recipe", "{tmp}/big.yaml"],
         "a recipe is a small YAML file",
         write("big.yaml", b"# padding\n" * 1_100_000)),
    Case("labels-float-values", [*RANDOM, "--data", "{tmp}/data", "--labels", "{tmp}/labels.yaml"],
         "expected a mapping", lambda t: (image_dir(["cats"])(t), (t / "labels.yaml").write_text("cats: 1.5\n"))),
]

#: Inputs that look unusual but are valid: the command must succeed (exit 0).
ACCEPTED = [
    Case("image-cmyk-jpeg", [*PREDICT, "{tmp}/cmyk.jpg"], "", image("cmyk.jpg", lambda: Image.new("CMYK", (50, 40)))),
    Case("image-16-bit-png", [*PREDICT, "{tmp}/deep.png"], "",
         image("deep.png", lambda: Image.fromarray(np.arange(2000, dtype=np.uint16).reshape(40, 50) * 30))),
    Case("image-rgba-png", [*PREDICT, "{tmp}/alpha.png"], "",
         image("alpha.png", lambda: Image.new("RGBA", (30, 70), (10, 200, 30, 100)))),
    Case("image-grey-for-rgb-model", [*PREDICT, "{tmp}/grey.png"], "",
         image("grey.png", lambda: Image.new("L", (33, 21)))),
]
