"""The low/high-effort cascade at inference, with onnxruntime alone (no torch): PIVOT (DAC 2024).

A cascade directory holds ``low.onnx`` and ``high.onnx`` (outputs ``logits`` and ``entropy``) and
``cascade.json`` with the entropy threshold. Every input runs through the low-effort model; those whose
entropy is at most the threshold exit there, and only the others are sent on to the high-effort model::

    from vitcompress.cascade import Cascade
    cascade = Cascade("runs/cascade")
    result = cascade.predict(cascade.load_images(["shoe.png"]))     # result.logits, result.early

:func:`calibrate_threshold` picks the threshold from the low model's entropies on validation images so that
a requested fraction of them exits early.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitcompress.errors import DataError, ModelError

CASCADE_FILE = "cascade.json"
INPUT_NAME, LOGITS, ENTROPY = "input", "logits", "entropy"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def calibrate_threshold(entropies: np.ndarray, fraction: float) -> float:
    """The threshold τ for which the share of ``entropies`` ≤ τ is closest to ``fraction``.

    τ lies halfway between two consecutive distinct values, so the count is exact whatever the rounding of
    τ; it is within one sample of ``fraction``·n unless several entropies tie at the boundary.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    values = np.unique(np.asarray(entropies, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no entropies to calibrate on")
    counts = np.searchsorted(np.sort(np.asarray(entropies, dtype=np.float64)), values, side="right")
    i = int(np.argmin(np.abs(counts - fraction * len(entropies))))
    return float(values[i] if i == len(values) - 1 else (values[i] + values[i + 1]) / 2)


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """CPU session, ``threads`` intra-op threads that do not spin (as vitcompress's validation uses)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class CascadeResult:
    """Per input: final logits, the low model's entropy, and whether it exited at the low model."""

    logits: np.ndarray
    entropy: np.ndarray
    early: np.ndarray


class Cascade:
    """Low → entropy threshold → high, for a batch, with onnxruntime sessions."""

    def __init__(self, directory: str | Path, threads: int = 2) -> None:
        directory = Path(directory)
        spec_path = directory / CASCADE_FILE
        if not spec_path.is_file():
            raise ModelError(f"{directory} is not a cascade directory: no {CASCADE_FILE} (convert with a "
                             "recipe that has a cascade: section)")
        try:
            spec = json.loads(spec_path.read_text())
            self.threshold = float(spec["threshold"])
            paths = {key: directory / spec[key] for key in ("low", "high")}
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{spec_path} is not a valid cascade file: {type(exc).__name__}: {exc}") from None
        for path in paths.values():
            if not path.is_file():
                raise ModelError(f"{path} named by {spec_path} does not exist")
        self.spec = spec
        self.low = ort_session(paths["low"], threads)
        self.high = ort_session(paths["high"], threads)
        self.metadata = self.low.get_modelmeta().custom_metadata_map

    def predict(self, images: np.ndarray) -> CascadeResult:
        """Run the cascade on a float32 batch (N, C, H, W), preprocessed as the models expect."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        logits, entropy = self.low.run([LOGITS, ENTROPY], {INPUT_NAME: images})
        early = entropy.astype(np.float64) <= self.threshold
        if not early.all():
            logits = logits.copy()
            logits[~early] = self.high.run([LOGITS], {INPUT_NAME: images[~early]})[0]
        return CascadeResult(logits=logits, entropy=entropy, early=early)

    @property
    def class_names(self) -> list[str] | None:
        names = self.metadata.get("vitcompress.class_names")
        return json.loads(names) if names else None

    def load_images(self, paths: list[str | Path]) -> np.ndarray:
        """Image files (or directories of them, sorted) → a batch preprocessed by the models' metadata."""
        return np.stack([preprocess(p, self.metadata) for p in image_files(paths)])


def image_files(paths: list[str | Path]) -> list[Path]:
    """The image files named, directories expanded to their images (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"image {path} does not exist")
    return files


def preprocess(path: Path, metadata: dict[str, str]) -> np.ndarray:
    """timm's eval transform from the ONNX metadata: resize the short side to size/crop_pct, centre crop,
    scale to [0, 1], normalise with mean/std."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = json.loads(metadata["vitcompress.input_size"])
    mean = np.array(json.loads(metadata["vitcompress.mean"]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(json.loads(metadata["vitcompress.std"]), dtype=np.float32).reshape(-1, 1, 1)
    crop_pct = float(metadata.get("vitcompress.crop_pct", 1.0))
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        metadata.get("vitcompress.interpolation", "bicubic"), Image.BICUBIC)
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from None
    scale = int(np.floor(max(height, width) / crop_pct))
    w, h = img.size
    if (w, h) != (scale, scale):
        ratio = scale / min(w, h)
        img = img.resize((max(scale, round(w * ratio)), max(scale, round(h * ratio))), resample)
    left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.float32) / 255.0
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return (array - mean) / std
