"""The deployable bundle: the files every ``convert`` output holds besides the model, and ``verify``.

A bundle runs with onnxruntime, numpy and Pillow alone (this module never imports torch) and proves itself
after it leaves the converting machine:

- ``preprocess.json``: the preprocessing of the ONNX metadata (input size, channels, mean, std,
  interpolation, crop_pct, crop_mode), for code that does not read ONNX metadata;
- ``labels.txt``: one class name per output (Triton's ``label_filename`` format);
- ``golden/``: a few real validation images as the model saw them (``inputs.npy``), the exported models'
  outputs on them (``logits.npy`` …), the source images when they can be stored, and ``golden.json``
  (which file checks which model; each model's precision, float32 or int8, and its tolerances; the converting
  CPU's instruction sets, :func:`~vitcompress.deploy.cpus.isa_flags`: on a CPU with others, an int8 model is
  checked with the looser cross-ISA tolerance);
- ``inference.json``: the onnxruntime settings the latency was measured with, and any offline optimisation;
- ``predict.py`` + ``requirements.txt``: a standalone classifier (:mod:`vitcompress.deploy.templates.predict`);
- ``SHA256SUMS``: every other file's SHA-256 (``sha256sum -c SHA256SUMS`` checks it too).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitcompress.deploy.cpus import isa_flags
from vitcompress.deploy.runtime import CASCADE_FILE, CPU, INPUT_NAME, LOGITS, Preprocessing, class_names, open_session
from vitcompress.errors import ModelError

MODEL, PREPROCESS, LABELS, INFERENCE = "model.onnx", "preprocess.json", "labels.txt", "inference.json"
PREDICT, REQUIREMENTS, SUMS = "predict.py", "requirements.txt", "SHA256SUMS"
#: The bundle's HTML report: a view of its checksummed files (report.json, predictions.npz, report/), rebuilt by
#: ``vitcompress report``, so SHA256SUMS does not list it and rebuilding it leaves the checksums valid.
PAGE = "report.html"
GOLDEN = "golden"
GOLDEN_SPEC = f"{GOLDEN}/golden.json"
#: |Δ logits| allowed between the converting machine's onnxruntime and another's (other CPU kernels, other
#: providers); float32 logits of a ViT differ by ~1e-5 between SIMD code paths.
GOLDEN_ATOL = 1e-3
#: int8 logits on the converting CPU's instruction sets: bench/golden_tolerance.py measured at most 0.026 between
#: onnxruntime's graph optimisation levels and thread counts on one CPU (vit_fmnist, dynamic and static int8,
#: docs/deploy.md); about twice that.
INT8_ATOL_SAME_ISA = 0.05
#: int8 logits on a CPU with other instruction sets (other int8 kernels: VNNI, AMX, AVX2's saturating u8×s8):
#: a margin of four times the one-CPU spread, NOT a cross-CPU measurement (no second kind of CPU was available).
INT8_ATOL_OTHER_ISA = 0.1
#: Per precision: (|Δ logits| on a CPU with the converting CPU's instruction sets, on one with others).
TOLERANCES = {"fp32": (GOLDEN_ATOL, GOLDEN_ATOL), "int8": (INT8_ATOL_SAME_ISA, INT8_ATOL_OTHER_ISA)}
#: ONNX operators that make a model int8 (onnxruntime.quantization's, and the recipes' own MatMulInteger layers).
INT8_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear",
                      "QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat", "QGemm", "QAttention",
                      "DynamicQuantizeMatMul"})
#: Grey levels (of 255) the preprocessing may differ by: Pillow's and torchvision's resampling round differently.
GREY_LEVELS = 1.0
GOLDEN_IMAGES = 8
GRAPH_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def preprocess_spec(preprocessing: Preprocessing) -> dict:
    """What ``preprocess.json`` holds: the ONNX metadata's preprocessing, with ``input_size`` as timm writes it."""
    spec = asdict(preprocessing)
    spec["input_size"] = [spec["channels"], spec.pop("height"), spec.pop("width")]
    spec["mean"], spec["std"] = list(spec["mean"]), list(spec["std"])
    return spec


def cascade_models(directory: Path) -> list[str]:
    """The ONNX files a cascade bundle's ``cascade.json`` names (none for a plain bundle)."""
    path = directory / CASCADE_FILE
    if not path.is_file():
        return []
    try:
        spec = json.loads(path.read_text())
        return [str(spec["low"]), str(spec["high"])]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a valid cascade file: {type(exc).__name__}: {exc}") from None


def model_files(directory: Path) -> list[str]:
    """The bundle's exported models: ``model.onnx`` and, for a cascade, its low and high models."""
    return [MODEL, *cascade_models(directory)]


def label_lines(metadata: Mapping[str, str], outputs: int) -> list[str]:
    """One label per model output: the class names of the ONNX metadata, else the class indices."""
    names = class_names(metadata)
    return [str(n) for n in names] if names and len(names) == outputs else [str(i) for i in range(outputs)]


def _run(path: Path, inputs: np.ndarray, threads: int, provider: str = CPU) -> np.ndarray:
    return open_session(path, threads, provider=provider).run([LOGITS], {INPUT_NAME: inputs})[0]


def model_precision(path: Path) -> str:
    """``int8`` when the ONNX file at ``path`` has an int8 operator (:data:`INT8_OPS`), else ``fp32``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    return "int8" if ops & INT8_OPS else "fp32"


def converting_cpu() -> dict:
    """What golden.json records of this CPU: architecture, model name and :func:`isa_flags`."""
    cpu = "unknown"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu, "flags": isa_flags()}


def _pins() -> str:
    """``requirements.txt`` of predict.py: the versions the bundle was validated with."""
    lines = []
    for package in ("onnxruntime", "numpy", "Pillow"):
        try:
            lines.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            lines.append(package)
    return "\n".join(lines) + "\n"


def write_bundle(directory: Path, inputs: np.ndarray, images: Sequence[tuple[str, bytes]] = (), *,
                 threads: int, latency: Mapping[int, dict] | None = None) -> None:
    """Write the bundle files next to the exported models in ``directory``, then ``SHA256SUMS`` over all files.

    Args:
        directory: holds ``model.onnx`` (and, for a cascade, ``cascade.json`` with its models).
        inputs: a few real validation images as the model takes them (N, C, H, W), float32.
        images: ``(file name, bytes)`` of the image files ``inputs`` were preprocessed from, in order, when
            they can be stored (empty otherwise; ``verify`` then skips the preprocessing check).
        threads: onnxruntime intra-op threads the latency was measured with.
        latency: the converted model's measured latency per batch size (``{1: {"p50_ms": …}, …}``).
    """
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    session = open_session(directory / MODEL, threads)
    metadata = session.get_modelmeta().custom_metadata_map
    preprocessing = Preprocessing.from_metadata(metadata)
    _write_json(directory / PREPROCESS, preprocess_spec(preprocessing))
    outputs = session.get_outputs()[0].shape[-1]
    (directory / LABELS).write_text("\n".join(label_lines(metadata, int(outputs))) + "\n")
    golden = directory / GOLDEN
    golden.mkdir(exist_ok=True)
    np.save(golden / "inputs.npy", inputs)
    logits = {}
    for name in model_files(directory):
        logits[name] = "logits.npy" if name == MODEL else f"{Path(name).stem}.logits.npy"
        np.save(golden / logits[name], _run(directory / name, inputs, threads))
    stored = []
    if images and len(images) == len(inputs):
        (golden / "images").mkdir(exist_ok=True)
        for i, (name, data) in enumerate(images):
            stored.append(f"images/{i:03d}{Path(name).suffix.lower()}")
            (golden / stored[-1]).write_bytes(data)
    models = {}
    for name in logits:
        precision = model_precision(directory / name)
        models[name] = {"precision": precision, "atol": TOLERANCES[precision][0],
                        "atol_other_isa": TOLERANCES[precision][1]}
    _write_json(directory / GOLDEN_SPEC, {
        "inputs": "inputs.npy", "outputs": logits, "atol": max(m["atol"] for m in models.values()),
        "models": models, "isa": converting_cpu(), "images": stored, "grey_levels": GREY_LEVELS,
        "about": "inputs: real validation images preprocessed as for the validation; outputs: each model's logits "
                 "on them in onnxruntime; images: the files the inputs came from (same order)"})
    _write_json(directory / INFERENCE, {
        "provider": CPU, "inter_op_threads": 1, "allow_spinning": False, "graph_optimization_level": "ORT_ENABLE_ALL",
        **inference_timing(threads, latency), "offline_optimization": []})
    (directory / PREDICT).write_text((Path(__file__).parent / "templates" / "predict.py").read_text())
    (directory / REQUIREMENTS).write_text(_pins())
    write_checksums(directory)


def inference_timing(threads: int, latency: Mapping[int, dict] | None) -> dict:
    """The part of ``inference.json`` that a latency measurement decides (threads, ORT version, timings per batch
    size, written ``"b8"``)."""
    return {"intra_op_threads": threads, "onnxruntime": ort.__version__, "batch_sizes": sorted(latency or {}),
            "latency": {f"b{batch}": timing for batch, timing in sorted((latency or {}).items())}}


def update_inference_timing(directory: Path, threads: int, latency: Mapping[int, dict]) -> None:
    """Replace the timing part of a bundle's ``inference.json`` (latency measured again; the rest kept).
    ``SHA256SUMS`` is then stale: call :func:`write_checksums` after the bundle's last change."""
    path = directory / INFERENCE
    spec = json.loads(path.read_text())
    _write_json(path, {**spec, **inference_timing(threads, latency)})


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ checksums


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(directory: Path) -> list[str]:
    """Every file under ``directory`` but ``SHA256SUMS`` and ``report.html``, as sorted POSIX paths relative to it."""
    return sorted(name for name in (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
                  if name not in (SUMS, PAGE))


def write_checksums(directory: Path) -> None:
    """``SHA256SUMS`` in ``sha256sum``'s format over every other file of the bundle."""
    lines = [f"{sha256(directory / name)}  {name}" for name in bundle_files(directory)]
    (directory / SUMS).write_text("\n".join(lines) + "\n")


def read_checksums(directory: Path) -> dict[str, str]:
    """File → SHA-256 from ``SHA256SUMS``; a directory without one, or a malformed one, is a ModelError."""
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a bundle directory (a vitcompress convert output)")
    path = directory / SUMS
    if not path.is_file():
        raise ModelError(f"{directory} is not a vitcompress bundle: no {SUMS} (convert writes one)")
    sums = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise ModelError(f"{path} line {number} is not '<sha256>  <file>': {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def check_checksums(directory: Path) -> dict[str, str]:
    """Every file ``SHA256SUMS`` lists exists with that hash (else a ModelError naming it); returns the sums."""
    sums = read_checksums(directory)
    for name, digest in sums.items():
        if not (directory / name).is_file():
            raise ModelError(f"{directory}: {name} is missing (listed in {SUMS})")
        if sha256(directory / name) != digest:
            raise ModelError(f"{directory}: checksum mismatch for {name}: the file changed after the bundle "
                             "was written (copy it again)")
    for name in (MODEL, GOLDEN_SPEC, PREPROCESS):
        if name not in sums:
            raise ModelError(f"{directory} is not a complete vitcompress bundle: {SUMS} does not list {name}")
    return sums


# --------------------------------------------------------------------------------------------------- verify


@dataclass
class Check:
    """One check of :func:`verify`: what, whether it passed, and the measured value in words."""

    name: str
    passed: bool
    detail: str


@dataclass
class Verification:
    """The checks :func:`verify` ran on a bundle; ``ok`` when every one passed."""

    bundle: str
    provider: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"bundle": self.bundle, "provider": self.provider, "ok": self.ok, "seconds": self.seconds,
                "checks": [asdict(c) for c in self.checks]}


def golden_spec(directory: Path) -> dict:
    try:
        spec = json.loads((directory / GOLDEN_SPEC).read_text())
        spec["outputs"] = dict(spec["outputs"])
        float(spec["atol"])
        return spec
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{directory / GOLDEN_SPEC} is not a valid golden spec: {type(exc).__name__}: {exc}") from None


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a numpy array file: {exc}") from None


def verify(directory: str | Path, provider: str = CPU, threads: int | None = None) -> Verification:
    """Check a bundle with onnxruntime alone: checksums, golden logits of every model, preprocessing.

    Raises a :class:`ModelError` (not a bundle, a missing file, a checksum mismatch, a model onnxruntime cannot
    load) and returns a :class:`Verification` whose failed checks say by how much the bundle is off.
    """
    start = time.perf_counter()
    directory = Path(directory)
    sums = check_checksums(directory)
    result = Verification(str(directory), provider)
    result.checks.append(Check("checksums", True, f"{len(sums)} files match {SUMS}"))
    spec = golden_spec(directory)
    threads = threads or _inference_threads(directory)
    inputs = _load_array(directory / GOLDEN / spec["inputs"]).astype(np.float32)
    other_isa = isa_difference(spec.get("isa"))
    for name, logits_file in spec["outputs"].items():
        want = _load_array(directory / GOLDEN / logits_file)
        got = _run(directory / name, inputs, threads, provider)
        if got.shape != want.shape:
            result.checks.append(Check(f"golden {name}", False, f"output shape {got.shape}, golden {want.shape}"))
            continue
        atol, why = golden_tolerance(spec, name, other_isa)
        diff = float(np.abs(got - want).max())
        agree = int((got.argmax(-1) == want.argmax(-1)).sum())
        result.checks.append(Check(f"golden {name}", diff <= atol, f"max |Δ logits| {diff:.2e} (tolerance "
                                   f"{atol:g}: {why}), top-1 {agree}/{len(want)} equal on {len(inputs)} images"))
    metadata = open_session(directory / MODEL, 1).get_modelmeta().custom_metadata_map
    preprocessing = Preprocessing.from_metadata(metadata)
    stored = json.loads((directory / PREPROCESS).read_text())
    same = stored == preprocess_spec(preprocessing)
    result.checks.append(Check("preprocess.json", same, "equals the ONNX metadata" if same else
                               f"differs from the ONNX metadata {preprocess_spec(preprocessing)}"))
    if spec.get("images"):
        result.checks.append(_preprocessing_check(directory, spec, preprocessing, inputs))
    result.seconds = time.perf_counter() - start
    return result


def isa_difference(recorded: dict | None) -> str | None:
    """How this CPU's instruction sets differ from the converting CPU's that golden.json records (None: the same,
    or a bundle that records none)."""
    if not isinstance(recorded, dict):
        return None
    here = converting_cpu()
    if recorded.get("machine") != here["machine"]:
        return f"{here['machine']} here, {recorded.get('machine')} when converted"
    was, now = set(recorded.get("flags") or []), set(here["flags"])
    if was == now:
        return None
    parts = ([f"lacks {', '.join(sorted(was - now))}"] if was - now else []) + \
        ([f"adds {', '.join(sorted(now - was))}"] if now - was else [])
    return "this CPU " + " and ".join(parts)


def golden_tolerance(spec: dict, name: str, other_isa: str | None) -> tuple[float, str]:
    """The tolerance for model ``name`` of a golden spec, and why: its precision's, the cross-ISA one when this
    CPU's instruction sets differ from the converting CPU's (``other_isa`` says how)."""
    entry = (spec.get("models") or {}).get(name)
    if not isinstance(entry, dict):
        return float(spec["atol"]), "the bundle's"
    if other_isa is not None and float(entry["atol_other_isa"]) != float(entry["atol"]):
        return float(entry["atol_other_isa"]), f"{entry['precision']} on another instruction set: {other_isa}"
    return float(entry["atol"]), entry["precision"]


def _preprocessing_check(directory: Path, spec: dict, preprocessing: Preprocessing, inputs: np.ndarray) -> Check:
    """The runtime's preprocessing of the stored source images against the golden inputs, in grey levels."""
    got = preprocessing.load([directory / GOLDEN / name for name in spec["images"]])
    if got.shape != inputs.shape:
        return Check("preprocessing", False, f"{got.shape} from the images, golden inputs {inputs.shape}")
    std = np.asarray(preprocessing.std, dtype=np.float32)[None, :, None, None]
    grey = float((np.abs(got - inputs) * std * 255).max())
    limit = float(spec.get("grey_levels", GREY_LEVELS))
    return Check("preprocessing", grey <= limit, f"max difference {grey:.3f} grey levels (tolerance {limit:g}) "
                 f"on {len(got)} source images")


def _inference_threads(directory: Path) -> int:
    try:
        return int(json.loads((directory / INFERENCE).read_text())["intra_op_threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return 2
