"""State passed explicitly between the stages of a conversion (no globals): the run's context and settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vitcompress.data import DataBundle
from vitcompress.evaluate import Predictions
from vitcompress.ladder import RungPass
from vitcompress.models import LoadedModel
from vitcompress.original_cache import OriginalCache
from vitcompress.progress import Progress
from vitcompress.recipe import Recipe
from vitcompress.report import PartTime, Sections, StageTime, Timings
from vitcompress.training.distributed import Dist


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
    #: a ``vitcompress sensitivity`` result to copy into the bundle for report.html's heat map
    sensitivity: Path | None = None
    labels: dict[str, int | str] | None = None
    deploy: DeployOptions = field(default_factory=DeployOptions)
    resume: bool = False


@dataclass
class StageClock:
    """Wall seconds of each stage of a conversion, and of named parts inside the stage that is running (the
    report's ``timings``)."""

    start: float = field(default_factory=lambda: time.perf_counter())
    stages: list[StageTime] = field(default_factory=list)
    _parts: list[PartTime] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the stage ``name`` (recorded when it finishes)."""
        self._parts = []
        begin = time.perf_counter()
        yield
        self.stages.append(StageTime(stage=name, seconds=time.perf_counter() - begin, parts=self._parts))
        self._parts = []

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a part of the running stage."""
        begin = time.perf_counter()
        yield
        self.add_part(name, time.perf_counter() - begin)

    def add_part(self, name: str, seconds: float) -> None:
        """A part of the running stage timed elsewhere (e.g. a transform step)."""
        self._parts.append(PartTime(name=name, seconds=seconds))

    def timings(self) -> Timings:
        """The stages finished so far, and the wall seconds since the clock started."""
        return Timings(seconds=time.perf_counter() - self.start, stages=list(self.stages))


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
    #: the ladder's passes measured before the ladder stage: the transformed model (before fine-tuning) and the
    #: original (the validation's torch parity reads its first images: one torch pass of the original, not two)
    rungs: dict[str, RungPass] = field(default_factory=dict)
    #: the validation's onnxruntime predictions of "original" and "converted" (top-k per image)
    predictions: dict[str, Predictions] = field(default_factory=dict)
    #: wall seconds per stage and part (the report's ``timings``)
    clock: StageClock = field(default_factory=StageClock)
    #: the recipe with its role and relative-depth selectors resolved on this model (the transform stage sets it)
    resolved_recipe: Recipe | None = None

    @property
    def onnx_path(self) -> Path:
        return self.work_dir / "model.onnx"

    @property
    def original_onnx_path(self) -> Path:
        """The original model's ONNX, for the side-by-side measurement; not part of the output bundle."""
        return self.scratch_dir / "original.onnx"
