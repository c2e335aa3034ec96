"""State passed explicitly between the stages of a conversion (no globals): the run's context and settings."""

from __future__ import annotations

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
from vitcompress.report import Sections
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
    #: the ladder's passes measured before the ladder stage (the transformed model, before fine-tuning)
    rungs: dict[str, RungPass] = field(default_factory=dict)
    #: the validation's onnxruntime predictions of "original" and "converted" (top-k per image)
    predictions: dict[str, Predictions] = field(default_factory=dict)
    #: the recipe with its role and relative-depth selectors resolved on this model (the transform stage sets it)
    resolved_recipe: Recipe | None = None

    @property
    def onnx_path(self) -> Path:
        return self.work_dir / "model.onnx"

    @property
    def original_onnx_path(self) -> Path:
        """The original model's ONNX, for the side-by-side measurement; not part of the output bundle."""
        return self.scratch_dir / "original.onnx"
