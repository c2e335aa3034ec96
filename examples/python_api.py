"""Compress a model from Python: load it, apply one transform, export to ONNX and check it in onnxruntime.

The embedded reference model ``vit_fmnist`` (a DeiT-Tiny-sized ViT trained on Fashion-MNIST, shipped with the
package) gets its MLP Linears factored by truncated SVD at half rank; the exported file is run in onnxruntime
and its top-1 predictions are compared with the original torch model's on seeded random images (so no dataset
is needed). About half a minute on 2 CPU cores.

    python examples/python_api.py [OUT_DIR]      # writes OUT_DIR/model.onnx (default: a temporary folder)
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import vitcompress
from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, open_session


def main(out_dir: Path) -> None:
    original = vitcompress.load_model("vit_fmnist").model
    model = vitcompress.apply(copy.deepcopy(original), vitcompress.LowRankConfig(rank_ratio=0.5))
    onnx_path = vitcompress.export_onnx(model, out_dir / "model.onnx")

    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, converted = original(images).numpy(), model(images).numpy()
    got = open_session(onnx_path, threads=2).run([LOGITS], {INPUT_NAME: images.numpy()})[0]
    params = [sum(p.numel() for p in m.parameters()) for m in (original, model)]
    print(f"parameters: {params[0]:,} → {params[1]:,}")
    print(f"onnxruntime vs torch (converted): max |Δ logits| = {np.abs(got - converted).max():.2e}")
    print(f"top-1 agreement with the original model: {(got.argmax(-1) == want.argmax(-1)).mean():.1%}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
