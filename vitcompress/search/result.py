"""What a tune study found, as ``pareto.json`` holds it: each measured trial and the study's front, best and miss."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from vitcompress.search.settings import TuneSettings
from vitcompress.search.trial import Measured


class TrialPoint(BaseModel):
    """One measured trial."""

    model_config = ConfigDict(extra="forbid")

    trial: int
    summary: str
    recipe: str = Field(description="the trial's complete recipe (YAML)")
    measured: Measured = Field(description="what the front reads: the confirmation replay's measurement when the "
                                           "trial was confirmed (see vitcompress.search.confirm), else the trial's")
    confirmed: bool = Field(False, description="whether ``measured`` is a confirmation replay")
    trial_measured: Optional[Measured] = Field(None, description="the trial's own measurement, when a "
                                                                 "confirmation replaced it")
    meets_constraints: bool
    file: Optional[str] = Field(None, description="pareto/NN.yaml, for a front entry")


class TuneResult(BaseModel):
    """What ``vitcompress tune`` found (``pareto.json``)."""

    model_config = ConfigDict(extra="forbid")

    settings: TuneSettings
    study: str
    storage: str
    trials: int = Field(description="finished trials (complete or pruned)")
    measured: int = Field(description="trials that produced a measurement")
    refused: int = Field(description="trials whose combination a transform or the exporter refused (pruned)")
    confirmed: int = Field(0, description="trials re-measured by a confirmation replay")
    front: list[TrialPoint]
    points: list[TrialPoint] = Field(description="every measured trial, in trial order")
    best: Optional[TrialPoint]
    nearest_miss: Optional[TrialPoint] = Field(description="without a best: the trial closest to the constraints")
    out_dir: Optional[str] = None
    machine: str
    date: str
