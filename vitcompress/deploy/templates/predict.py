"""Classify images with this vitcompress bundle: onnxruntime, numpy and Pillow only (``pip install -r
requirements.txt``).

    python predict.py IMAGE_OR_DIR... [--top-k 3] [--threads 2]
    python predict.py --verify

``--verify`` checks the bundle where it lies, with the same three packages: every file against ``SHA256SUMS``,
each model's logits on the golden inputs against the converting machine's (``golden/golden.json``: the
tolerance of the model's precision, the looser cross-ISA one for an int8 model when this CPU's instruction sets
differ from the converting CPU's) and this file's preprocessing of the stored source images against the golden
inputs. One line per check; exit code 0 when all pass, 1 when one fails.

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
import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: /proc/cpuinfo flags that select onnxruntime's CPU kernels (vitcompress.deploy.cpus.ISA_FLAGS, the same list).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sums() -> tuple[bool, str]:
    """Every file SHA256SUMS lists is here with that hash."""
    lines = (HERE / "SHA256SUMS").read_text().splitlines()
    bad = []
    for line in lines:
        digest, _, name = line.partition("  ")
        path = HERE / name
        if not path.is_file():
            bad.append(f"{name} missing")
        elif sha256(path) != digest.lower():
            bad.append(f"{name} changed")
    return not bad, "; ".join(bad) if bad else f"{len(lines)} files match SHA256SUMS"


def isa_difference(recorded: dict | None) -> str | None:
    """How this CPU's instruction sets differ from the converting CPU's (None: the same, or none recorded)."""
    if not isinstance(recorded, dict):
        return None
    machine, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = set(value.split()) & set(ISA_FLAGS)
                break
    except OSError:
        pass
    if recorded.get("machine") != machine:
        return f"{machine} here, {recorded.get('machine')} when converted"
    was = set(recorded.get("flags") or [])
    if was == flags:
        return None
    parts = ([f"lacks {', '.join(sorted(was - flags))}"] if was - flags else []) + \
        ([f"adds {', '.join(sorted(flags - was))}"] if flags - was else [])
    return "this CPU " + " and ".join(parts)


def tolerance(spec: dict, name: str, other_isa: str | None) -> tuple[float, str]:
    """The golden tolerance of model ``name`` and why (vitcompress.deploy.bundle.golden_tolerance's rule)."""
    entry = (spec.get("models") or {}).get(name)
    if not isinstance(entry, dict):
        return float(spec["atol"]), "the bundle's"
    if other_isa is not None and float(entry["atol_other_isa"]) != float(entry["atol"]):
        return float(entry["atol_other_isa"]), f"{entry['precision']} on another instruction set: {other_isa}"
    return float(entry["atol"]), entry["precision"]


def verify(threads: int | None) -> int:
    """Check the bundle: checksums, golden logits, preprocessing; print one line per check; 0 when all pass."""
    checks = [("checksums", *check_sums())]
    spec = json.loads((HERE / "golden" / "golden.json").read_text())
    inference = json.loads((HERE / "inference.json").read_text())
    threads = threads or int(inference.get("intra_op_threads", 2))
    inputs = np.load(HERE / "golden" / spec["inputs"], allow_pickle=False).astype(np.float32)
    other_isa = isa_difference(spec.get("isa"))
    for name, logits_file in spec["outputs"].items():
        want = np.load(HERE / "golden" / logits_file, allow_pickle=False)
        got = session(name, threads).run(["logits"], {"input": inputs})[0]
        atol, why = tolerance(spec, name, other_isa)
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else math.inf
        checks.append((f"golden {name}", diff <= atol, f"max |Δ logits| {diff:.2e} (tolerance {atol:g}: {why})"))
    if spec.get("images"):
        preprocess = Preprocess(json.loads((HERE / "preprocess.json").read_text()))
        arrays = []
        for name in spec["images"]:
            with Image.open(HERE / "golden" / name) as image:
                arrays.append(preprocess(image))
        grey = float((np.abs(np.stack(arrays) - inputs) * preprocess.std[None, :, None, None] * 255).max())
        limit = float(spec.get("grey_levels", 1.0))
        checks.append(("preprocessing", grey <= limit, f"max difference {grey:.3f} grey levels (tolerance "
                                                       f"{limit:g}) on {len(arrays)} source images"))
    for name, passed, detail in checks:
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    passed = all(ok for _, ok, _ in checks)
    print(f"bundle {HERE}: {'verified' if passed else 'FAILED'}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files or directories of images")
    parser.add_argument("--top-k", type=int, default=3, help="classes to print per image")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: 2; "
                        "with --verify the bundle's inference.json's)")
    parser.add_argument("--verify", action="store_true", help="check this bundle instead of classifying images")
    args = parser.parse_args(argv)
    if args.verify:
        if args.images:
            sys.exit("error: --verify checks the bundle: give no images")
        try:
            sys.exit(verify(args.threads))
        except (OSError, ValueError, KeyError) as exc:
            sys.exit(f"error: this bundle cannot be verified: {type(exc).__name__}: {exc}")
    if not args.images:
        sys.exit("error: give image files or directories (or --verify)")
    args.threads = args.threads or 2
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
