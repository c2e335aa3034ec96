"""Faster start on the serving host: a bundle's models optimised offline (``vitcompress export optimized``).

``model.opt.onnx``: onnxruntime's graph optimisations applied once and saved (``optimized_model_filepath``),
so a session does not redo them at every start. Only the ``basic`` level is portable (constant folding,
redundant-node elimination); ``extended`` and ``all`` fuse into kernels and layouts of the machine at hand,
so they need ``for_this_machine`` and are recorded in ``inference.json`` as such. ``model.ort``: the ORT
format, written by onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``, its
portable default: all optimisations but the NCHWc layout). Every written file must reproduce the bundle's
golden logits before it joins the bundle; then ``golden.json``, ``inference.json`` and ``SHA256SUMS`` are
rewritten, so ``vitcompress verify`` checks the new files too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vitcompress.deploy.bundle import (
    GOLDEN,
    GOLDEN_SPEC,
    GRAPH_LEVELS,
    INFERENCE,
    check_checksums,
    golden_spec,
    model_files,
    write_checksums,
)
from vitcompress.deploy.runtime import INPUT_NAME, LOGITS, open_session, session_options
from vitcompress.errors import GateError, UsageError


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), for files optimised for this machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _optimized_onnx(source: Path, target: Path, level: str) -> None:
    options = session_options(1)
    options.graph_optimization_level = GRAPH_LEVELS[level]
    options.optimized_model_filepath = str(target)
    open_session(source, options=options)


def _ort_format(source: Path, work: Path) -> Path:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    staged = work / "ort-src"
    staged.mkdir()
    shutil.copyfile(source, staged / source.name)
    tool_log = logging.getLogger("ort_format_model.utils")  # the converter logs its operator config at INFO
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(staged / source.name, output_dir=work / "ort-out",
                                       optimization_styles=[OptimizationStyle.Fixed])
    finally:
        tool_log.setLevel(level)
    return work / "ort-out" / f"{source.stem}.ort"


def check_options(level: str | None, for_this_machine: bool) -> None:
    """A known level, and one beyond ``basic`` only ``for_this_machine`` (UsageError otherwise)."""
    if level is not None and level not in GRAPH_LEVELS:
        raise UsageError(f"--optimize-offline {level!r}: expected one of {', '.join(GRAPH_LEVELS)}")
    if level not in (None, "basic") and not for_this_machine:
        raise UsageError(f"--optimize-offline {level} fuses for this machine's CPU: the file may not run, or run "
                         "slower, elsewhere; pass --for-this-machine on the serving host, or use basic")


def optimize_offline(bundle: str | Path, level: str | None = "basic", *, for_this_machine: bool = False,
                     ort_format: bool = False) -> list[str]:
    """Write ``<model>.opt.onnx`` (``level``) and/or ``<model>.ort`` for each of the bundle's models.

    Returns the names of the files added. Raises UsageError for a level beyond ``basic`` without
    ``for_this_machine``, GateError (exit 1) when a written file does not reproduce the golden logits, and
    ModelError for a bundle that does not pass its checksums; nothing is added to the bundle then.
    """
    bundle = Path(bundle)
    check_options(level, for_this_machine)
    if level is None and not ort_format:
        raise UsageError("nothing to do: give --optimize-offline LEVEL and/or --ort-format")
    check_checksums(bundle)
    spec = golden_spec(bundle)
    inputs = np.load(bundle / GOLDEN / spec["inputs"]).astype(np.float32)
    atol = float(spec["atol"])  # the largest same-ISA tolerance of the bundle's models
    records, staged = [], {}
    with tempfile.TemporaryDirectory(prefix=".optimize-", dir=bundle) as tmp:
        work = Path(tmp)
        for name in model_files(bundle):
            stem, source = Path(name).stem, bundle / name
            if level is not None:
                staged[f"{stem}.opt.onnx"] = work / f"{stem}.opt.onnx"
                _optimized_onnx(source, staged[f"{stem}.opt.onnx"], level)
                records.append({"file": f"{stem}.opt.onnx", "from": name, "level": level,
                                "for_this_machine": for_this_machine})
            if ort_format:
                staged[f"{stem}.ort"] = _ort_format(source, work)
                records.append({"file": f"{stem}.ort", "from": name, "level": "all (portable: no NCHWc layout)",
                                "for_this_machine": False})
        for record in records:
            want = np.load(bundle / GOLDEN / spec["outputs"][record["from"]])
            got = open_session(staged[record["file"]], 1).run([LOGITS], {INPUT_NAME: inputs})[0]
            diff = float(np.abs(got - want).max())
            if diff > atol:
                raise GateError(f"{record['file']} differs from the golden logits by {diff:.2e} (tolerance "
                                f"{atol:g}): not added to the bundle")
            record.update(max_abs_diff=diff, onnxruntime=ort.__version__)
            if record["for_this_machine"]:
                record["machine"] = cpu_name()
        for file, path in staged.items():
            shutil.move(path, bundle / file)
    for record in records:  # an optimised file is checked as its source is (its precision and tolerances)
        spec["outputs"][record["file"]] = spec["outputs"][record["from"]]
        if record["from"] in spec.get("models", {}):
            spec["models"][record["file"]] = spec["models"][record["from"]]
    (bundle / GOLDEN_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    inference = json.loads((bundle / INFERENCE).read_text())
    done = {r["file"] for r in records}
    inference["offline_optimization"] = [r for r in inference.get("offline_optimization", [])
                                         if r.get("file") not in done] + records
    (bundle / INFERENCE).write_text(json.dumps(inference, indent=2) + "\n")
    write_checksums(bundle)
    return sorted(done)
