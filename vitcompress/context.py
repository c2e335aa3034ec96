"""State passed explicitly between the stages of a conversion (no globals), and the progress interface.

The library reports progress through a :class:`Progress` object; the CLI passes a rich implementation,
Python users get :class:`LogProgress` (standard ``logging``) unless they pass their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import nn

from vitcompress.data import DataBundle
from vitcompress.models import LoadedModel
from vitcompress.original_cache import OriginalCache
from vitcompress.recipe import Recipe
from vitcompress.report import Sections
from vitcompress.training.distributed import Dist

log = logging.getLogger("vitcompress")


class Progress(Protocol):
    """Receives stage boundaries and per-step progress of long work."""

    def stage(self, name: str, description: str) -> None: ...

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None: ...

    def finish(self, task: str) -> None: ...


class LogProgress:
    """Progress through ``logging``: stage starts, then every tenth of a task."""

    def __init__(self) -> None:
        self._tasks: dict[str, list[int]] = {}

    def stage(self, name: str, description: str) -> None:
        log.info("[%s] %s", name, description)

    def start(self, task: str, total: int) -> None:
        self._tasks[task] = [0, total]

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None:
        done, total = self._tasks[task]
        self._tasks[task][0] = done + amount
        if total and (done + amount) * 10 // total != done * 10 // total:
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            log.info("%s %d/%d %s", task, done + amount, total, extra)

    def finish(self, task: str) -> None:
        self._tasks.pop(task, None)


@dataclass(frozen=True)
class DeployOptions:
    """Offline-optimised files to add to the bundle (:mod:`vitcompress.deploy.optimize`)."""

    optimize_offline: str | None = None
    for_this_machine: bool = False
    ort_format: bool = False


@dataclass
class ConvertSettings:
    """What the user asked for, besides the recipe."""

    model: str
    out_dir: Path
    model_source: Literal["argument", "recipe"] = "argument"
    checkpoint: Path | None = None
    data: str | None = None
    force: bool = False
    random_init: bool = False
    #: ``timm.create_model`` arguments that change the architecture (random init only), e.g. ``{"depth": 2}``
    model_args: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, int | str] | None = None
    deploy: DeployOptions = field(default_factory=DeployOptions)
    resume: bool = False


@dataclass
class RunContext:
    """Everything the stages read and write during one conversion."""

    settings: ConvertSettings
    recipe: Recipe
    work_dir: Path
    scratch_dir: Path
    progress: Progress
    original: LoadedModel | None = None
    model: nn.Module | None = None
    data: DataBundle | None = None
    report: Sections = field(default_factory=Sections)
    #: this process's place in a torchrun job (one process by default)
    dist: Dist = field(default_factory=Dist)
    #: where the fine-tune saves checkpoints (rank 0) and a resume reads them; None: no checkpoints
    checkpoint_dir: Path | None = None
    #: the original's ONNX export and predictions, shared with other conversions that the caller gives the same cache
    cache: OriginalCache = field(default_factory=OriginalCache)

    @property
    def onnx_path(self) -> Path:
        return self.work_dir / "model.onnx"

    @property
    def original_onnx_path(self) -> Path:
        """The original model's ONNX, for the side-by-side measurement; not part of the output bundle."""
        return self.scratch_dir / "original.onnx"
