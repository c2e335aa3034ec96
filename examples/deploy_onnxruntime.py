"""Classify images with a vitcompress ONNX file and nothing but onnxruntime, numpy and Pillow.

The preprocessing (input size, mean, std, interpolation, crop fraction, class names) is read from the ONNX
file's metadata, where ``vitcompress convert`` wrote it, so deployment never guesses it.

    python examples/deploy_onnxruntime.py runs/demo/model.onnx image1.png image2.jpg
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def preprocess(path: str, meta: dict[str, str]) -> np.ndarray:
    """Resize the short side to size/crop_pct, centre-crop to size, scale to [0, 1], normalise (timm eval)."""
    channels, height, width = json.loads(meta["vitcompress.input_size"])
    mean = np.array(json.loads(meta["vitcompress.mean"]), dtype=np.float32)[:, None, None]
    std = np.array(json.loads(meta["vitcompress.std"]), dtype=np.float32)[:, None, None]
    crop_pct = float(meta["vitcompress.crop_pct"])
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(meta["vitcompress.interpolation"],
                                                                          Image.BILINEAR)
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    scale = math.floor(height / crop_pct) / min(image.size)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
    return (array - mean) / std


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta.get("vitcompress.class_names", "null"))
    batch = np.stack([preprocess(p, meta) for p in sys.argv[2:]])
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for path, p in zip(sys.argv[2:], probs):
        k = int(p.argmax())
        print(f"{path}: {classes[k] if classes else k} ({p[k]:.1%})")


if __name__ == "__main__":
    main()
