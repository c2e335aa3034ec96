"""Running vitcompress ONNX files with onnxruntime, numpy and Pillow alone (importing this never imports torch).

Everything in vitcompress that runs an ONNX file goes through here, so a deployment host without torch runs
exactly what the validation measured:

- the graph's input/output names and the preprocessing contract in its ``metadata_props``
  (:func:`preprocessing_metadata` writes it at export, :class:`Preprocessing` reads it back);
- :func:`session_options` / :func:`open_session`: CPU sessions whose intra-op threads do not spin-wait;
- :func:`measure_latency`: interleaved timing of several models (median, p90, spread);
- :class:`Preprocessing`: timm's eval transform (``resolve_data_config`` + ``create_transform``) on PIL images;
- :class:`Cascade`: PIVOT's low/high-effort entropy cascade (DAC 2024) and :func:`calibrate_threshold`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitcompress.errors import DataError, ModelError

INPUT_NAME, LOGITS, ENTROPY = "input", "logits", "entropy"
CASCADE_FILE = "cascade.json"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
META = "vitcompress."
#: timm's interpolation names → Pillow resampling filters (timm.data.transforms._str_to_pil_interpolation).
RESAMPLING = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
CROP_MODES = ("center", "squash")
CPU = "CPUExecutionProvider"


def session_options(threads: int) -> ort.SessionOptions:
    """Options of every session: ``threads`` intra-op threads that do not spin-wait between runs.

    Spinning threads of one session steal the cores from the next one in an interleaved measurement (seen
    here: the same pair of models measured 1.62× apart with spinning, 2.02× without), so spinning is off.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def open_session(path: str | Path, threads: int = 1, options: ort.SessionOptions | None = None,
                 provider: str = CPU) -> ort.InferenceSession:
    """A session of the ONNX (or ORT-format) file at ``path``; a missing or unloadable file is a
    :class:`ModelError`.

    Args:
        path: the ONNX file.
        threads: intra-op threads (ignored when ``options`` is given).
        options: session options to use instead of :func:`session_options` (e.g. with profiling on).
        provider: the onnxruntime execution provider (one of ``onnxruntime.get_available_providers()``; the
            CPU provider is added after it as the fallback for nodes it does not take).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX file {path} does not exist")
    available = ort.get_available_providers()
    if provider not in available:
        raise ModelError(f"execution provider {provider!r} is not available in this onnxruntime "
                         f"(available: {', '.join(available)})")
    try:
        return ort.InferenceSession(str(path), options or session_options(threads),
                                    providers=list(dict.fromkeys([provider, CPU])))
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, InvalidGraph, …)
        raise ModelError(f"{path} does not load in onnxruntime: {str(exc).strip().splitlines()[0]}") from None


def run_batches(session: ort.InferenceSession, batches: Iterable[np.ndarray],
                outputs: Sequence[str] = (LOGITS,)) -> list[np.ndarray]:
    """``outputs`` of ``session`` over every batch of images, each concatenated along the batch axis."""
    collected: list[list[np.ndarray]] = [[] for _ in outputs]
    for images in batches:
        for store, value in zip(collected, session.run(list(outputs), {INPUT_NAME: np.ascontiguousarray(images)})):
            store.append(value)
    return [np.concatenate(values) for values in collected]


@dataclass(frozen=True)
class Timing:
    """Latency of one model at one batch size over interleaved runs, in milliseconds.

    ``spread`` is (p90 − p10) / p50: how far apart a typical slow and fast run were, relative to the median.
    """

    p50_ms: float
    p90_ms: float
    mean_ms: float
    spread: float
    runs: int

    @classmethod
    def of(cls, milliseconds: Sequence[float]) -> "Timing":
        ms = np.asarray(milliseconds, dtype=np.float64)
        p10, p50, p90 = np.percentile(ms, [10, 50, 90])
        return cls(p50_ms=float(p50), p90_ms=float(p90), mean_ms=float(ms.mean()),
                   spread=float((p90 - p10) / p50) if p50 > 0 else 0.0, runs=len(ms))

    def as_dict(self) -> dict[str, float | int]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "mean_ms": self.mean_ms, "spread": self.spread,
                "runs": self.runs}


def time_interleaved(sessions: Mapping[str, ort.InferenceSession], feeds: Mapping[str, Mapping[str, np.ndarray]],
                     *, runs: int, warmup: int) -> dict[str, Timing]:
    """Time ``session.run(None, feed)`` of every session, round-robin: A, B, A, B, … after ``warmup`` runs each.

    Interleaving makes machine noise (other processes, frequency changes) hit every model alike, so their
    ratio is meaningful even when absolute times drift.
    """
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing.of(ms) for name, ms in times.items()}


def input_shape(session: ort.InferenceSession) -> tuple[int, ...]:
    """The fixed shape past the batch axis of the session's one image input."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs: vitcompress runs models with one image input")
    shape = inputs[0].shape[1:]
    if not all(isinstance(d, int) for d in shape):
        raise ModelError(f"input shape {inputs[0].shape} is not fixed past the batch axis")
    return tuple(shape)


def measure_latency(paths: Mapping[str, str | Path], *, batch_sizes: Sequence[int], threads: int, runs: int,
                    warmup: int, images: np.ndarray | None = None) -> dict[str, dict[int, dict]]:
    """Per model and batch size, the :class:`Timing` (as a dict) of interleaved onnxruntime runs.

    Args:
        paths: name → ONNX file; each gets a session with ``threads`` non-spinning intra-op threads.
        batch_sizes: the batch sizes to time, one interleaved round each.
        threads: intra-op threads per session.
        runs: timed runs per model and batch size.
        warmup: untimed runs per model before them.
        images: real inputs to time on (the first ``batch`` of them; a model with a token router does
            data-dependent work); seeded Gaussian noise of the model's input shape when None.
    """
    sessions = {name: open_session(path, threads) for name, path in paths.items()}
    shape = input_shape(next(iter(sessions.values())))
    results: dict[str, dict[int, dict]] = {name: {} for name in sessions}
    for batch in batch_sizes:
        x = (np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32) if images is None
             else np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32))
        feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
        for name, timing in time_interleaved(sessions, feeds, runs=runs, warmup=warmup).items():
            results[name][batch] = timing.as_dict()
    return results


def preprocessing_metadata(data_config: Mapping, class_names: Sequence[str] | None) -> dict[str, str]:
    """The ONNX ``metadata_props`` that :class:`Preprocessing` reads: timm's data config and the class names."""
    meta = {
        f"{META}input_size": json.dumps([int(v) for v in data_config["input_size"]]),
        f"{META}mean": json.dumps([float(v) for v in data_config["mean"]]),
        f"{META}std": json.dumps([float(v) for v in data_config["std"]]),
        f"{META}interpolation": str(data_config.get("interpolation") or "bicubic"),
        f"{META}crop_pct": str(data_config.get("crop_pct") or 0.875),
        f"{META}crop_mode": str(data_config.get("crop_mode") or "center"),
    }
    if class_names:
        meta[f"{META}class_names"] = json.dumps(list(class_names))
    return meta


def class_names(metadata: Mapping[str, str]) -> list[str] | None:
    """The class names an ONNX file's metadata lists, if any."""
    names = metadata.get(f"{META}class_names")
    return json.loads(names) if names else None


@dataclass(frozen=True)
class Preprocessing:
    """timm's eval transform, from an ONNX file's metadata, on PIL images: no torch, same pixels.

    ``center``: resize the short side to ⌊size / crop_pct⌋ (the long side to ⌊that · long / short⌋, as
    torchvision's ``Resize(int)``), centre-crop to the input size (offsets rounded as torchvision's
    ``CenterCrop``); ``squash``: resize both sides to ⌊size / crop_pct⌋, then centre-crop. Then scale to
    [0, 1] and normalise with mean and std.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "Preprocessing":
        """Read the contract written by :func:`preprocessing_metadata`; a missing or bad key is a ModelError."""
        try:
            channels, height, width = json.loads(metadata[f"{META}input_size"])
            config = cls(channels=int(channels), height=int(height), width=int(width),
                         mean=tuple(json.loads(metadata[f"{META}mean"])), std=tuple(json.loads(metadata[f"{META}std"])),
                         interpolation=metadata.get(f"{META}interpolation", "bicubic"),
                         crop_pct=float(metadata.get(f"{META}crop_pct", 0.875)),
                         crop_mode=metadata.get(f"{META}crop_mode", "center"))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"the ONNX file has no valid vitcompress preprocessing metadata ({exc})") from None
        if config.interpolation not in RESAMPLING or config.crop_mode not in CROP_MODES or not 0 < config.crop_pct <= 1:
            raise ModelError(f"unsupported preprocessing: interpolation {config.interpolation!r}, crop_mode "
                             f"{config.crop_mode!r}, crop_pct {config.crop_pct} (supported: {', '.join(RESAMPLING)}; "
                             f"{', '.join(CROP_MODES)}; crop_pct in (0, 1])")
        return config

    @classmethod
    def from_data_config(cls, data_config: Mapping) -> "Preprocessing":
        """From timm's data config (``resolve_data_config``): what the exported metadata will say."""
        return cls.from_metadata(preprocessing_metadata(data_config, None))

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> "Preprocessing":
        return cls.from_metadata(session.get_modelmeta().custom_metadata_map)

    def _scale_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the resized image before the centre crop."""
        scale_h, scale_w = math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_w, scale_h
        if scale_h != scale_w:  # timm's ResizeKeepRatio: the short side's ratio decides, sides rounded
            ratio = min(height / scale_h, width / scale_w)
            return round(width / ratio), round(height / ratio)
        short, long = min(width, height), max(width, height)
        new_long = int(scale_h * long / short)
        return (scale_h, new_long) if width <= height else (new_long, scale_h)

    def __call__(self, image) -> np.ndarray:
        """A PIL image → the (C, H, W) float32 array the model takes."""
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        size = self._scale_size(*image.size)
        if size != image.size:
            image = image.resize(size, Image.Resampling(RESAMPLING[self.interpolation]))
        top = int(round((image.height - self.height) / 2.0))
        left = int(round((image.width - self.width) / 2.0))
        image = image.crop((left, top, left + self.width, top + self.height))
        array = np.asarray(image, dtype=np.float32).reshape(self.height, self.width, self.channels) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((array - mean) / std).transpose(2, 0, 1).astype(np.float32)

    def load(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Image files (or directories of them, sorted) → one preprocessed batch; unreadable files are a
        :class:`DataError` naming the file."""
        from PIL import Image, UnidentifiedImageError

        arrays = []
        for path in image_files(paths):
            try:
                with Image.open(path) as image:
                    image.load()
                    arrays.append(self(image))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"image {path} cannot be read: {exc}") from None
        return np.stack(arrays)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` (stable)."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


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


@dataclass
class CascadeResult:
    """Per input: final logits, the low model's entropy, and whether it exited at the low model."""

    logits: np.ndarray
    entropy: np.ndarray
    early: np.ndarray


class Cascade:
    """PIVOT's input-aware inference: every input runs through ``low.onnx``; those whose softmax entropy is
    at most the calibrated threshold exit there, the others go on to ``high.onnx``::

        cascade = Cascade("runs/cascade")
        result = cascade.predict(cascade.preprocessing.load(["shoe.png"]))   # result.logits, result.early
    """

    def __init__(self, directory: str | Path, threads: int = 2, provider: str = CPU) -> None:
        """Open the cascade that ``vitcompress convert`` wrote to ``directory`` (cascade.json, low/high.onnx),
        on the onnxruntime execution ``provider``."""
        directory = Path(directory)
        spec_path = directory / CASCADE_FILE
        if not spec_path.is_file():
            raise ModelError(f"{directory} is not a cascade directory: no {CASCADE_FILE} (convert with a "
                             "recipe that has a cascade: section)")
        try:
            spec = json.loads(spec_path.read_text())
            self.threshold = float(spec["threshold"])
            paths = {key: directory / spec[key] for key in ("low", "high")}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{spec_path} is not a valid cascade file: {type(exc).__name__}: {exc}") from None
        self.spec = spec
        self.low = open_session(paths["low"], threads, provider=provider)
        self.high = open_session(paths["high"], threads, provider=provider)
        for name, session in (("low", self.low), ("high", self.high)):
            if {o.name for o in session.get_outputs()} != {LOGITS, ENTROPY}:
                raise ModelError(f"{paths[name]} is not a cascade model: its outputs must be {LOGITS}, {ENTROPY}")
        self.metadata = self.low.get_modelmeta().custom_metadata_map
        self.preprocessing = Preprocessing.from_metadata(self.metadata)

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
        return class_names(self.metadata)
