"""Classify images with a vitcompress ONNX file on a host without torch: onnxruntime, numpy and Pillow.

The preprocessing (input size, mean, std, interpolation, crop fraction, class names) is read from the ONNX
file's metadata, where ``vitcompress convert`` wrote it, so deployment never guesses it;
:mod:`vitcompress.deploy.runtime` applies it exactly as timm's eval transform does, and never imports torch.

    python examples/deploy_onnxruntime.py runs/demo/model.onnx image1.png image2.jpg
"""

from __future__ import annotations

import sys

from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, Preprocessing, class_names, open_session, softmax


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    session = open_session(sys.argv[1], threads=2)
    batch = Preprocessing.from_session(session).load(sys.argv[2:])
    probs = softmax(session.run([LOGITS], {INPUT_NAME: batch})[0])
    classes = class_names(session.get_modelmeta().custom_metadata_map)
    for path, p in zip(sys.argv[2:], probs):
        k = int(p.argmax())
        print(f"{path}: {classes[k] if classes else k} ({p[k]:.1%})")


if __name__ == "__main__":
    main()
