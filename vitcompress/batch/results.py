"""``batch.json``: the versioned result of a batch (or of merged shards), and the exit code it implies.

Paths in it (bundles, logs) are relative to the folder of the ``batch.json``, so the folder can be moved,
uploaded as a CI artifact or merged with other shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from vitcompress.batch.gates import GateResult

SCHEMA = "vitcompress.batch"
#: 2 added the manifest's fingerprint and, in merged results, each shard's record; version 1 files still load.
SCHEMA_VERSION = 2
Status = Literal["passed", "gate_failed", "error", "timeout", "cached", "skipped"]
STATUSES: tuple[str, ...] = ("passed", "cached", "gate_failed", "error", "timeout", "skipped")
FailOn = Literal["error", "gate", "never"]
#: Exit codes of a batch: every job passed (or was skipped), a gate failed, a job crashed or timed out.
EXIT_OK, EXIT_GATE, EXIT_ERROR = 0, 1, 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheInfo(_Strict):
    hit: bool
    key: Optional[str] = Field(None, description="conversion key (sha256)")
    latency_key: Optional[str] = None
    reasons: list[str] = Field(default_factory=list, description="why the job missed the cache ([] on a hit)")
    remeasured: bool = Field(False, description="the conversion was a hit, but the machine or the timing settings "
                             "changed: the bundle's latency was measured again (reasons say what changed)")


class JobResult(_Strict):
    name: str
    model: str
    recipe: str
    status: Status
    exit_code: Optional[int] = Field(None, description="the convert process's exit code (negative: a signal)")
    duration_s: float = 0.0
    cache: Optional[CacheInfo] = None
    threads: Optional[int] = None
    latency_wait_s: Optional[float] = Field(None, description="seconds spent waiting for the latency lock")
    metrics: Optional[dict[str, Any]] = None
    gates: list[GateResult] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="the error line (error, timeout) or why it was skipped")
    log_tail: Optional[str] = None
    bundle: Optional[str] = None
    log: Optional[str] = None

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if g.passed is False]


class ShardRecord(_Strict):
    """One shard of a merged result: which share it ran, of which manifest, where, with which versions."""

    source: str = Field(description="the shard's batch.json, relative to the merged folder")
    shard: str = Field(description="K/N (1/1: an unsharded run)")
    manifest_sha256: Optional[str]
    date: str
    machine: dict[str, Any]
    versions: dict[str, str]
    wall_s: float


class BatchResult(_Strict):
    schema_name: Literal["vitcompress.batch"] = Field(SCHEMA, alias="schema")
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    manifest: str
    manifest_sha256: Optional[str] = Field(None, description="the manifest's fingerprint (manifest_fingerprint)")
    date: str
    machine: dict[str, Any]
    versions: dict[str, str]
    parallel_jobs: int
    shard: Optional[str] = None
    cadence: Optional[str] = None
    wall_s: float
    fail_on: FailOn = "gate"
    baseline: Optional[str] = None
    shards: list[ShardRecord] = Field(default_factory=list, description="merged results: each shard's record")
    missing_shards: list[str] = Field(default_factory=list, description="merge --allow-partial: shards not given")
    counts: dict[str, int] = Field(default_factory=dict)
    exit_code: int = 0
    jobs: list[JobResult]

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def finish(self) -> "BatchResult":
        """Fill in ``counts`` and ``exit_code`` from the jobs."""
        self.counts = {s: sum(j.status == s for j in self.jobs) for s in STATUSES}
        self.exit_code = exit_code(self.jobs, self.fail_on)
        return self

    def dump(self, path: Path) -> None:
        from vitcompress.batch.keys import write_json

        write_json(path, self.model_dump(mode="json", by_alias=True))

    @classmethod
    def load(cls, path: Path) -> "BatchResult":
        return cls.model_validate_json(path.read_text())


def exit_code(jobs: list[JobResult], fail_on: FailOn) -> int:
    """3 when a job crashed or timed out, else 1 when a gate failed, else 0; ``fail_on`` says which count:
    ``gate`` both, ``error`` only crashes and timeouts, ``never`` none."""
    if fail_on == "never":
        return EXIT_OK
    if any(j.status in ("error", "timeout") for j in jobs):
        return EXIT_ERROR
    if fail_on == "gate" and any(j.status == "gate_failed" for j in jobs):
        return EXIT_GATE
    return EXIT_OK
