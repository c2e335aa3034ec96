"""Content keys of batch jobs: when a finished bundle may stand for a job, and why it may not.

The conversion key is the sha256 of what decides the converted model and its accuracy numbers: the resolved
recipe (after overrides) without its gate thresholds and timing settings, the model name, the weights (the
checkpoint file's sha256, the embedded weights' sha256, the timm pretrained tag, or random init), a data
fingerprint, the fine-tune seed, the device kind, the code (:mod:`vitcompress.batch.code_hash`: the sha256 of the
imported package's files and of the job's plugin transforms' files) and the versions of vitcompress, torch, timm,
onnx, onnxscript and onnxruntime. No paths, job names, gates or timestamps: moving a checkout, renaming a job or changing a
threshold keeps the key. Latency is keyed on top by the timing settings and a machine fingerprint (CPU model,
cores, threads, onnxruntime version): when only those changed, the batch re-measures the bundle's latency
(``vitcompress batch remeasure``) instead of converting again.

``VITCOMPRESS_TEST_MACHINE`` (tests only) is added to the machine fingerprint as ``test``: a test changes it to
play "the same bundle on another machine" without another machine.

``cache_key.json`` in each job folder keeps the components of the bundle on disk and of the last check, so a
miss names what changed ("recipe changed", "timm 1.0.30 → 1.0.31", "machine changed: …").
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from vitcompress.batch.code_hash import PACKAGE_DIR, file_sha256, fingerprint, package_fingerprint, plugin_files
from vitcompress.batch.manifest import Job
from vitcompress.deploy.cpus import available_cpus
from vitcompress.files import replace_text

KEY_PACKAGES = ("vitcompress", "torch", "timm", "onnx", "onnxscript", "onnxruntime")
#: Recipe fields that only set gate thresholds (re-evaluated from report.json, never a reason to convert).
GATE_FIELDS = ("max_abs_diff", "max_top1_drop", "min_agreement")
#: Recipe fields that only change latency measurement: part of the latency key.
TIMING_FIELDS = ("batch_sizes", "latency_runs", "warmup_runs", "profile_runs")
#: Test-only: a value added to the machine fingerprint (see the module docstring). Never set it in CI.
TEST_MACHINE_ENV = "VITCOMPRESS_TEST_MACHINE"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


#: A file's sha256, remembered for the process (the job inputs a batch reads do not change while it runs).
sha256_file = cache(file_sha256)


@cache
def package_versions() -> dict[str, str]:
    found = {}
    for package in KEY_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_fingerprint(threads: int) -> dict[str, Any]:
    """What latency depends on besides the models: CPU model, usable cores, onnxruntime's intra-op threads (the
    recipe's ``validate.threads``) and its version."""
    found = {"cpu": cpu_model(), "cores": available_cpus(), "threads": threads,
             "onnxruntime": package_versions()["onnxruntime"]}
    if os.environ.get(TEST_MACHINE_ENV):
        found["test"] = os.environ[TEST_MACHINE_ENV]
    return found


def _weights(job: Job) -> str:
    if job.random_init:
        return "random init"
    if job.checkpoint is not None:
        return f"checkpoint sha256:{sha256_file(job.checkpoint)}"
    from vitcompress.models import REFERENCE_MODELS, embedded_weights, resolve_name

    resolved = resolve_name(job.model)
    if resolved in REFERENCE_MODELS:
        return f"embedded sha256:{sha256_file(embedded_weights(resolved))}"
    import timm.models

    cfg = timm.models.get_pretrained_cfg(resolved)
    return f"timm pretrained {resolved}.{getattr(cfg, 'tag', None) or 'default'}"


def data_fingerprint(job: Job) -> str:
    """The data's identity: a name for built-in data (Fashion-MNIST: the sha256 of its files), for an image
    directory the sha256 of every file's relative path, size and modification time (not the images' bytes:
    reading a large dataset on every batch would cost more than the conversions it saves)."""
    from vitcompress.models import REFERENCE_MODELS, resolve_name

    data = job.data
    if data is None:
        data = "synthetic" if job.random_init or resolve_name(job.model) not in REFERENCE_MODELS else "fmnist"
    if data == "synthetic":
        return "synthetic"
    if data == "fmnist":
        from vitcompress.data import fmnist_dir

        files = sorted(p for p in fmnist_dir().glob("*-ubyte*") if p.is_file())
        return "fmnist " + sha256_text(canonical([(p.name, sha256_file(p)) for p in files]))
    root = Path(data)
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.is_file())
    return f"directory ({len(entries)} files) " + sha256_text(canonical(entries))


def _device(job: Job) -> str:
    finetune = job.recipe.finetune
    if finetune is None:
        return "cpu"
    if finetune.device != "auto":
        return finetune.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def code_fingerprint(job: Job) -> str:
    """The code that converts ``job``: the package's fingerprint, with its plugin transforms' files when it
    uses any (a recipe's ``plugins:``, entry points)."""
    recipe = job.recipe
    steps = list(recipe.steps)
    if recipe.cascade is not None:
        steps += [*recipe.cascade.low, *(recipe.cascade.high if isinstance(recipe.cascade.high, list) else [])]
    extra = plugin_files({type(step) for step in steps})
    return fingerprint(PACKAGE_DIR, extra) if extra else package_fingerprint()


def job_components(job: Job) -> dict[str, Any]:
    """Everything the two keys hash, by name (kept in cache_key.json to explain a miss). The batch's thread
    budget for torch is not in it: it changes how fast a job converts, not what it measures."""
    recipe = job.recipe.model_dump(mode="json", by_alias=True)
    validate = recipe["validate"]
    timing = {k: validate.pop(k) for k in TIMING_FIELDS}
    ort_threads = validate.pop("threads")
    for gate in GATE_FIELDS:
        validate.pop(gate)
    conversion = {
        "recipe": sha256_text(canonical(recipe)), "model": job.model, "weights": _weights(job),
        "data": data_fingerprint(job), "seed": job.recipe.finetune.seed if job.recipe.finetune else None,
        "device": _device(job), "code": code_fingerprint(job), "versions": package_versions(),
    }
    if job.model_args:  # only when given: the keys of full-size jobs stay what they were
        conversion["model_args"] = job.model_args
    return {
        "conversion": conversion,
        "latency": {"timing": timing, "machine": machine_fingerprint(ort_threads)},
    }


def keys_of(components: dict[str, Any]) -> tuple[str, str]:
    """(conversion key, latency key) of :func:`job_components`' result."""
    conversion = sha256_text(canonical(components["conversion"]))
    return conversion, sha256_text(conversion + canonical(components["latency"]))


LABELS = {"recipe": "recipe changed", "model": "model changed", "weights": "weights changed",
          "data": "data changed", "seed": "seed changed", "device": "device changed",
          "model_args": "model arguments changed", "code": "code changed (the vitcompress package's files or the "
          "job's plugin transforms)"}


def miss_reasons(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why a bundle made with ``old`` components is not the conversion ``new`` ones ask for ([] = its converted
    model may stand; its latency may still need measuring again: :func:`latency_reasons`)."""
    if old is None:
        return ["no finished bundle (first run, or the last run failed or was interrupted)"]
    reasons = []
    before, after = old["conversion"], new["conversion"]
    for key, label in LABELS.items():
        if before.get(key) != after.get(key):
            detail = (f": {before.get(key)} → {after.get(key)}" if key in ("model", "seed", "device", "model_args")
                      else "")
            reasons.append(label + detail)
    for package, value in after["versions"].items():
        if before.get("versions", {}).get(package) != value:
            reasons.append(f"{package} {before.get('versions', {}).get(package, '?')} → {value}")
    return reasons


def latency_reasons(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed in the latency components (machine fingerprint, timing settings) of a bundle whose
    conversion still stands, e.g. ``machine changed (threads 1 → 2)`` ([] = its timings stand too)."""
    reasons = []
    for part in ("timing", "machine"):
        was, now = old["latency"][part], new["latency"][part]
        changed = [f"{k} {was.get(k)} → {now.get(k)}" for k in now if was.get(k) != now.get(k)]
        if changed:
            label = "latency settings" if part == "timing" else "machine"
            reasons.append(f"{label} changed ({', '.join(changed)})")
    return reasons


def read_key_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a temporary sibling renamed over it): a killed batch never leaves half a file."""
    replace_text(path, json.dumps(value, indent=2, default=str) + "\n")
