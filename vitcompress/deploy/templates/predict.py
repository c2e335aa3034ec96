"""Classify images with this vitcompress bundle: onnxruntime, numpy and Pillow only (``pip install -r
requirements.txt``).

    python predict.py IMAGE_OR_DIR... [--top-k 3] [--threads 2]

The model, its preprocessing (``preprocess.json``) and its class names (``labels.txt``) are found beside this
file; a cascade bundle (``cascade.json``) runs the low-effort model and sends the images whose softmax entropy
is above the calibrated threshold on to the high-effort one. Prints each image's top classes by name.

vitcompress writes this file into every bundle (it is ``vitcompress/deploy/templates/predict.py``). It imports
nothing of vitcompress, so its preprocessing is a copy of ``vitcompress.deploy.runtime.Preprocessing`` (timm's eval
transform: resize the short side to size / crop_pct, centre crop, scale to [0, 1], normalise); the test suite
checks that both give the same arrays, and ``vitcompress verify`` that they give the exported model's inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: timm's interpolation names → Pillow resampling filters.
RESAMPLING = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class Preprocess:
    """preprocess.json applied to a PIL image → the (C, H, W) float32 array the model takes."""

    def __init__(self, spec: dict) -> None:
        self.channels, self.height, self.width = (int(v) for v in spec["input_size"])
        self.mean = np.asarray(spec["mean"], dtype=np.float32)
        self.std = np.asarray(spec["std"], dtype=np.float32)
        self.resample = Image.Resampling(RESAMPLING[spec["interpolation"]])
        self.crop_pct = float(spec["crop_pct"])
        self.crop_mode = spec.get("crop_mode", "center")

    def scale_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize that precedes the centre crop."""
        scale_h, scale_w = math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_w, scale_h
        if scale_h != scale_w:
            ratio = min(height / scale_h, width / scale_w)
            return round(width / ratio), round(height / ratio)
        short, long = min(width, height), max(width, height)
        new_long = int(scale_h * long / short)
        return (scale_h, new_long) if width <= height else (new_long, scale_h)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("L" if self.channels == 1 else "RGB")
        size = self.scale_size(*image.size)
        if size != image.size:
            image = image.resize(size, self.resample)
        top = int(round((image.height - self.height) / 2.0))
        left = int(round((image.width - self.width) / 2.0))
        image = image.crop((left, top, left + self.width, top + self.height))
        array = np.asarray(image, dtype=np.float32).reshape(self.height, self.width, self.channels) / 255.0
        return ((array - self.mean) / self.std).transpose(2, 0, 1).astype(np.float32)


def image_paths(arguments: list[str]) -> list[Path]:
    """The files named, directories expanded to their images (sorted)."""
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            paths += sorted(p for p in argument.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            paths.append(argument)
    return paths


def session(name: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(HERE / name), options, providers=["CPUExecutionProvider"])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def classify(batch: np.ndarray, threads: int) -> np.ndarray:
    """Logits of a preprocessed batch: model.onnx, or the cascade when the bundle is one."""
    cascade_file = HERE / "cascade.json"
    if not cascade_file.is_file():
        return session("model.onnx", threads).run(["logits"], {"input": batch})[0]
    spec = json.loads(cascade_file.read_text())
    logits, entropy = session(spec["low"], threads).run(["logits", "entropy"], {"input": batch})
    hard = entropy.astype(np.float64) > float(spec["threshold"])
    if hard.any():
        logits[hard] = session(spec["high"], threads).run(["logits"], {"input": batch[hard]})[0]
    return logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files or directories of images")
    parser.add_argument("--top-k", type=int, default=3, help="classes to print per image")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    preprocess = Preprocess(json.loads((HERE / "preprocess.json").read_text()))
    labels = (HERE / "labels.txt").read_text().splitlines()
    paths = image_paths(args.images)
    if not paths:
        sys.exit("error: no images given")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess(image))
        except (OSError, ValueError, SyntaxError) as exc:
            sys.exit(f"error: image {path} cannot be read: {exc}")
    probabilities = softmax(classify(np.stack(arrays), args.threads))
    for path, p in zip(paths, probabilities):
        top = np.argsort(-p)[: args.top_k]
        print(f"{path}: " + ", ".join(f"{labels[k]} {p[k]:.1%}" for k in top))


if __name__ == "__main__":
    main()
