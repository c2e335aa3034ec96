"""``--baseline``: compare a batch with a previous ``batch.json`` and fail jobs that regressed beyond tolerance.

Per job present in both with metrics: converted top-1 may fall at most ``baseline.top1_points`` points,
agreement at most ``baseline.agreement``, and each batch size's speed-up at most the fraction
``baseline.speedup_margin`` (latency is noisy; the margin is the stated noise allowance). Regressions are gates
with source ``baseline``: they fail the job like any other gate.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from vitcompress.batch.gates import gate_result
from vitcompress.batch.manifest import Baseline, ManifestError
from vitcompress.batch.results import BatchResult


def load_baseline(path: Path) -> BatchResult:
    try:
        return BatchResult.load(path)
    except OSError as exc:
        raise ManifestError(f"--baseline {path}: cannot read it ({exc.strerror})") from None
    except (ValidationError, ValueError) as exc:
        detail = str(exc).strip().splitlines()
        raise ManifestError(f"--baseline {path}: not a vitcompress batch.json of schema version 1 or 2 "
                            f"({detail[0] if detail else 'invalid'})") from None


def apply_baseline(batch: BatchResult, previous: BatchResult, tolerance: Baseline, source: str) -> None:
    """Add the baseline gates to every comparable job of ``batch`` (in place) and recompute its exit code."""
    before = {job.name: job.metrics for job in previous.jobs if job.metrics}
    for job in batch.jobs:
        old = before.get(job.name)
        if not job.metrics or old is None:
            continue
        new, gates = job.metrics, []
        if new.get("top1") is not None and old.get("top1") is not None:
            gates.append(gate_result("top1", "baseline", new["top1"], old["top1"] - tolerance.top1_points, False,
                                     f"top-1 vs baseline {old['top1']:.4g}"))
        gates.append(gate_result("agreement", "baseline", new["agreement"], old["agreement"] - tolerance.agreement,
                                 False, f"agreement vs baseline {old['agreement']:.4g}"))
        for key in sorted(k for k in new if k.startswith("speedup_") and k in old):
            batch_size = key.removeprefix("speedup_")
            gates.append(gate_result("speedup", "baseline", new[key], old[key] * (1 - tolerance.speedup_margin),
                                     False, f"speed-up {batch_size} vs baseline {old[key]:.3g}×", batch=batch_size,
                                     unit="×"))
        job.gates += gates
        if any(g.passed is False for g in gates) and job.status in ("passed", "cached"):
            job.status = "gate_failed"
    batch.baseline = source
    batch.finish()
