"""What a tune study is: its settings (the study's identity, checked on resume) and the checks of bad input.

Two runs with the same :class:`TuneSettings` are one study: a rerun resumes it. Anything that changes what a
trial measures (model, weights, data, targets, space, timing, fidelity, recipe overrides) is part of it; how the
work is run (workers, trial count, progress) is not.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from vitcompress.errors import UsageError

Objective = Literal["accuracy", "latency"]
Sampler = Literal["tpe", "nsga2"]


class TuneSettings(BaseModel):
    """The identity of a study (stored in the study as the ``vitcompress.settings`` user attribute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    checkpoint: Optional[str] = None
    random_init: bool = False
    model_args: dict[str, Any] = Field(default_factory=dict)
    data: Optional[str] = None
    objective: Objective = "accuracy"
    max_drop: float = 1.0
    target_speedup: Optional[float] = None
    target_latency_ms: Optional[float] = None
    batch_size: int = 1
    images: int = 1000
    runs: int = 30
    finetune_steps: int = 0
    overrides: list[str] = Field(default_factory=list)
    space: dict[str, Any] = Field(description="the --space file's content (defaults filled in)")
    sampler: Sampler = "tpe"
    seed: int = 0

    def constraints(self, speedup: float, latency_ms: float, drop: float, parity: float = 0.0) -> dict[str, float]:
        """Optuna constraint values by name (≤ 0: met): the accuracy budget (objective accuracy), the speed
        target, each as far as the trial is from its limit, and ``parity`` (how far a float graph's ONNX logits
        are beyond the parity gate: an export that changed the function is never a result)."""
        values = {"drop": drop - self.max_drop} if self.objective == "accuracy" else {}
        values["parity"] = parity
        if self.target_speedup is not None:
            values["speedup"] = self.target_speedup - speedup
        if self.target_latency_ms is not None:
            values["latency_ms"] = latency_ms - self.target_latency_ms
        return values

    def limits(self) -> dict[str, float]:
        """Each constraint's limit, the scale of its violation (:func:`~vitcompress.search.front.nearest_miss`)."""
        limits = {"drop": max(self.max_drop, 0.1)} if self.objective == "accuracy" else {}
        limits["parity"] = 1e-3
        if self.target_speedup is not None:
            limits["speedup"] = self.target_speedup
        if self.target_latency_ms is not None:
            limits["latency_ms"] = self.target_latency_ms
        return limits

    def target_text(self) -> str:
        parts = [f"top-1 drop ≤ {self.max_drop:g} pt"] if self.objective == "accuracy" else []
        if self.target_speedup is not None:
            parts.append(f"speed-up ≥ {self.target_speedup:g}×")
        if self.target_latency_ms is not None:
            parts.append(f"latency ≤ {self.target_latency_ms:g} ms at batch {self.batch_size}")
        return ", ".join(parts) or "no constraint"


def check_targets(max_drop: float, target_speedup: float | None, target_latency_ms: float | None,
                  trials: int, workers: int) -> None:
    """Targets no conversion can meet, and counts that make no search, are bad input (exit 2)."""
    if not 0 <= max_drop <= 100:
        raise UsageError(f"--max-drop {max_drop:g}: points of top-1 between 0 and 100")
    if target_speedup is not None and target_latency_ms is not None:
        raise UsageError("--target-speedup and --target-latency-ms exclude each other: give one target")
    if target_speedup is not None and not 1 < target_speedup <= 1000:
        raise UsageError(f"--target-speedup {target_speedup:g}: a speed-up over the original, above 1 "
                         "(the original itself is 1×) and at most 1000")
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise UsageError(f"--target-latency-ms {target_latency_ms:g}: a latency is more than 0 ms")
    if trials < 1:
        raise UsageError(f"--trials {trials}: at least one trial")
    if workers < 1:
        raise UsageError(f"--workers {workers}: at least one worker")
