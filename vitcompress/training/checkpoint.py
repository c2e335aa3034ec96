"""Fine-tune checkpoints, and what ``convert --resume`` checks before it continues from one.

A checkpoint directory (hidden, beside the output: ``.<out>.partial-checkpoint``) holds

* ``resume.json``: what the run was — the resolved recipe, the model and its weights, the data, the number of
  processes — written when the conversion starts; ``--resume`` refuses to continue a different one;
* ``latest.json``: the name of the newest complete checkpoint, replaced atomically after it is written;
* ``stageS-stepN/``: ``student.safetensors`` (weights at step N), ``before.safetensors`` (weights from before the
  run, which the divergence guard restores), ``state.pt`` (optimizer, scheduler, gradient scaler, RNG states:
  tensors and numbers only, loadable with ``torch.load(weights_only=True)``) and ``state.json`` (stage, step,
  losses, the finished stages' results).

Only rank 0 writes; on resume rank 0 reads and broadcasts (the other ranks may be on other machines).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitcompress.errors import ResumeError
from vitcompress.files import replace_text

IDENTITY_FILE = "resume.json"
LATEST_FILE = "latest.json"
log = logging.getLogger("vitcompress")


@dataclass
class TrainState:
    """Everything a fine-tune needs to continue exactly where it stopped."""

    stage: int
    step: int
    student: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}


def rng_states() -> dict[str, Any]:
    """The torch RNG states of this process (CPU, and every CUDA device when there are any)."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(directory: Path, state: TrainState) -> Path:
    """Write ``state`` as ``stageS-stepN`` under ``directory``, point ``latest.json`` at it, drop older checkpoints."""
    name = f"stage{state.stage}-step{state.step}"
    target = directory / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    save_file(_weights(state.student), str(target / "student.safetensors"))
    save_file(_weights(state.before), str(target / "before.safetensors"))
    torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler,
                "rng": state.rng}, target / "state.pt")
    (target / "state.json").write_text(json.dumps({"stage": state.stage, "step": state.step,
                                                   "progress": state.progress}))
    replace_text(directory / LATEST_FILE, json.dumps({"checkpoint": name}))
    for old in directory.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(directory: Path) -> TrainState | None:
    """The newest complete checkpoint under ``directory``, or None when there is none."""
    try:
        name = json.loads((directory / LATEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None
    source = directory / name
    try:
        tensors = torch.load(source / "state.pt", weights_only=True)
        meta = json.loads((source / "state.json").read_text())
        return TrainState(stage=meta["stage"], step=meta["step"],
                          student=load_file(str(source / "student.safetensors")),
                          before=load_file(str(source / "before.safetensors")), optimizer=tensors["optimizer"],
                          scheduler=tensors["scheduler"], scaler=tensors["scaler"], rng=tensors["rng"],
                          progress=meta["progress"])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ResumeError(f"checkpoint {source} cannot be read ({type(exc).__name__}: {exc}): start over "
                          "without --resume") from None


def write_identity(directory: Path, identity: dict[str, Any]) -> None:
    """Record what this run is (``resume.json``), so that a resume can refuse a different one."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True))


def check_resumable(directory: Path, identity: dict[str, Any]) -> None:
    """Raise :class:`ResumeError` unless ``directory`` holds a checkpoint of this very run: the same resolved
    recipe, model, weights, data and number of processes (the message names each difference)."""
    try:
        saved = json.loads((directory / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        raise ResumeError(f"--resume: no interrupted conversion to resume ({directory} holds no checkpoint): "
                          "run without --resume") from None
    if not (directory / LATEST_FILE).is_file():
        raise ResumeError(f"--resume: the interrupted conversion stopped before its first checkpoint "
                          f"({directory}): run without --resume")
    changed = [key for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
    if changed:
        details = "; ".join(_difference(key, saved.get(key), identity.get(key)) for key in changed)
        raise ResumeError(f"--resume: this is not the interrupted conversion: {details} (resume with the same "
                          "recipe, --set values, model, weights, data and process count, or start over without "
                          "--resume)")


def _difference(key: str, before: Any, now: Any) -> str:
    if key == "recipe" and isinstance(before, str) and isinstance(now, str):
        old, new = before.splitlines(), now.splitlines()
        lines = [f"{a.strip()!r} → {b.strip()!r}" for a, b in zip(old, new) if a != b]
        return "recipe changed: " + (", ".join(lines[:3]) or "lines added or removed")
    return f"{key} was {before!r}, now {now!r}"


def directory_for(out_dir: Path) -> Path:
    """The hidden checkpoint directory of a conversion into ``out_dir`` (beside it, like its work directory)."""
    return out_dir.parent / f".{out_dir.name}.partial-checkpoint"


def _file_identity(path: Path | None) -> str | None:
    """A weights file as the resume check compares it: its path, size and modification time."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return str(path)
    return f"{path.resolve()} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"


def run_identity(recipe_yaml: str, model: str, weights: Path | None, random_init: bool, data: str | None,
                 world_size: int, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must not change between an interrupted conversion and its ``--resume`` (``model_args`` only when
    given, so that checkpoints written before they existed still resume)."""
    identity = {"recipe": recipe_yaml, "model": model, "weights": _file_identity(weights), "random_init": random_init,
                "data": str(Path(data).resolve()) if data and Path(data).is_dir() else data, "world_size": world_size}
    return {**identity, "model_args": model_args} if model_args else identity


@contextmanager
def lifetime(directory: Path | None, identity: dict[str, Any], resume: bool, enabled: bool) -> Iterator[None]:
    """Around a conversion (rank 0, under the output lock): check a resume, or clear a stale checkpoint and
    record this run; afterwards delete the checkpoints when it finished, keep them when it was interrupted."""
    if directory is None:
        if resume:
            raise ResumeError("--resume needs an output directory (a temporary one is never resumed)")
        yield
        return
    if resume:
        check_resumable(directory, identity)
    else:
        shutil.rmtree(directory, ignore_errors=True)
        if enabled:
            write_identity(directory, identity)
    try:
        yield
    except BaseException:
        if (directory / LATEST_FILE).is_file():
            log.warning("fine-tune checkpoint kept in %s: rerun the same command with --resume to continue", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
