"""Gates and metrics of a finished job, computed from its ``report.json`` (never from a fresh conversion).

The recipe's own gates use the thresholds of the recipe as it is now (so changing a threshold re-evaluates a
cached bundle instead of converting again); the manifest's gates come on top: ``min_speedup`` and
``max_latency_ms`` per batch size, ``max_top1_drop``, ``min_agreement``, ``max_abs_diff``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from vitcompress.batch.manifest import Gates, Job
from vitcompress.report import Report


class GateResult(BaseModel):
    """One gate: the measured value, the limit and the verdict (None: skipped, ``message`` says why)."""

    model_config = ConfigDict(extra="forbid")

    gate: str
    source: str  # recipe, manifest or baseline
    batch: Optional[str] = None
    value: Optional[float]
    limit: float
    passed: Optional[bool]
    message: str

    @property
    def label(self) -> str:
        return f"{self.gate}{f' {self.batch}' if self.batch else ''} ({self.source})"


def metrics(report: Report) -> dict[str, Any]:
    """The numbers batch.json, the JUnit properties and the summary show for a job."""
    models = report.validation.models
    original, converted = models["original"], models["converted"]
    result: dict[str, Any] = {
        "params": converted.params, "params_original": original.params,
        "macs": converted.macs, "macs_original": original.macs,
        "top1": converted.top1, "top1_original": original.top1,
        "top1_drop": None if original.top1 is None or converted.top1 is None else original.top1 - converted.top1,
        "agreement": converted.agreement, "max_abs_diff": converted.parity.max_abs_diff,
    }
    for batch, timing in converted.latency.items():
        result[f"latency_b{batch}_ms"] = timing.p50_ms
        result[f"latency_b{batch}_original_ms"] = original.latency[batch].p50_ms
        result[f"speedup_b{batch}"] = original.latency[batch].p50_ms / timing.p50_ms
    return result


def gate_result(gate: str, source: str, value: Optional[float], limit: float, at_most: bool, what: str,
          batch: Optional[str] = None, unit: str = "", note: str = "") -> GateResult:
    if value is None:
        return GateResult(gate=gate, source=source, batch=batch, value=None, limit=limit, passed=None,
                          message=f"{what}: skipped ({note or 'not measured'})")
    passed = value <= limit if at_most else value >= limit
    sign = ("≤" if passed else ">") if at_most else ("≥" if passed else "<")
    return GateResult(gate=gate, source=source, batch=batch, value=value, limit=limit, passed=passed,
                      message=f"{what} {value:.4g}{unit} {sign} {limit:.4g}{unit}")


def _per_batch(value: float | dict[str, float], batches: list[str]) -> dict[str, float]:
    return {b: value for b in batches} if not isinstance(value, dict) else value


def evaluate(job: Job, report: Report) -> list[GateResult]:
    """Every gate of the job (recipe first, then manifest) on its report."""
    m = metrics(report)
    no_labels = "the validation data has no labels"
    v = job.recipe.validate_
    result = [gate_result("max_abs_diff", "recipe", m["max_abs_diff"], v.max_abs_diff, True, "max |torch − ORT|")]
    if v.max_top1_drop is not None:
        result.append(gate_result("max_top1_drop", "recipe", m["top1_drop"], v.max_top1_drop, True, "top-1 drop",
                            note=no_labels))
    if v.min_agreement is not None:
        result.append(gate_result("min_agreement", "recipe", m["agreement"], v.min_agreement, False, "agreement"))
    result += manifest_gates(job.gates, m, [f"b{batch}" for batch in report.validation.models["converted"].latency])
    return result


def manifest_gates(gates: Gates, m: dict[str, Any], batches: list[str]) -> list[GateResult]:
    result = []
    if gates.max_abs_diff is not None:
        result.append(gate_result("max_abs_diff", "manifest", m["max_abs_diff"], gates.max_abs_diff, True,
                            "max |torch − ORT|"))
    if gates.max_top1_drop is not None:
        result.append(gate_result("max_top1_drop", "manifest", m["top1_drop"], gates.max_top1_drop, True, "top-1 drop",
                            note="the validation data has no labels"))
    if gates.min_agreement is not None:
        result.append(gate_result("min_agreement", "manifest", m["agreement"], gates.min_agreement, False, "agreement"))
    if gates.min_speedup is not None:
        for batch, limit in _per_batch(gates.min_speedup, batches).items():
            result.append(gate_result("min_speedup", "manifest", m.get(f"speedup_{batch}"), limit, False,
                                f"speed-up {batch}", batch=batch, unit="×"))
    if gates.max_latency_ms is not None:
        for batch, limit in _per_batch(gates.max_latency_ms, batches).items():
            result.append(gate_result("max_latency_ms", "manifest", m.get(f"latency_{batch}_ms"), limit, True,
                                f"latency {batch} p50", batch=batch, unit=" ms"))
    return result
