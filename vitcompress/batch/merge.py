"""``vitcompress batch merge``: join the ``batch.json`` of CI shards into one result, or say why it would be wrong.

Each shard records its share (``K/N``) and its manifest's fingerprint. Merging refuses, with one error naming the
files: results of different manifests (another commit's, another ``--set``), shards of different counts, a shard
given twice, a job in two shards, and missing shards (a CI shard that uploaded nothing would otherwise just make
the result smaller). ``allow_partial`` merges what is there and records the missing shards. Each shard's
machine, versions and date are kept (``shards``); the top-level ``machine`` and ``versions`` hold only what all
shards share. Relative bundle and log paths are rewritten relative to the merged folder, so the merged
``junit.xml`` and ``summary.md`` point at the shards' artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vitcompress.batch.manifest import ManifestError
from vitcompress.batch.results import BatchResult, ShardRecord


def load_shard(path: Path) -> BatchResult:
    try:
        return BatchResult.load(path)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValidationError, ValueError) as exc:
        detail = str(exc).strip().splitlines()
        raise ManifestError(f"{path}: not a vitcompress batch.json ({detail[0] if detail else 'invalid'})") from None


def _share(result: BatchResult) -> tuple[int, int]:
    k, _, n = (result.shard or "1/1").partition("/")
    return int(k), int(n)


def _check_shards(shards: list[tuple[Path, BatchResult]], allow_partial: bool) -> list[str]:
    """Raise on shards that cannot be one result; return the missing shares ("K/N") that ``allow_partial``
    accepts."""
    unrecorded = [str(path) for path, s in shards if s.manifest_sha256 is None or s.shard == "merged"]
    if unrecorded:
        raise ManifestError(f"{', '.join(unrecorded)}: record no manifest fingerprint (a batch.json of an older "
                            "vitcompress, or already merged): run the shard again")
    by_manifest: dict[str, list[str]] = {}
    for path, s in shards:
        by_manifest.setdefault(s.manifest_sha256 or "", []).append(str(path))
    if len(by_manifest) > 1:
        groups = "; ".join(f"{', '.join(paths)} (manifest {digest[:12]})" for digest, paths in by_manifest.items())
        raise ManifestError(f"results from different manifests cannot be merged: {groups}")
    counts = {path: _share(s)[1] for path, s in shards}
    if len(set(counts.values())) > 1:
        raise ManifestError("shards of different counts: " + ", ".join(f"{p} is {s.shard or '1/1'}"
                                                                       for p, s in shards))
    given: dict[int, Path] = {}
    for path, s in shards:
        k, n = _share(s)
        if k in given:
            raise ManifestError(f"shard {k}/{n} given twice: {given[k]} and {path}")
        given[k] = path
    n = next(iter(counts.values()))
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in given]
    if missing and not allow_partial:
        raise ManifestError(f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)}: only "
                            f"{', '.join(f'{k}/{n}' for k in sorted(given))} given (a shard that wrote no "
                            "batch.json?); --allow-partial merges what is there")
    return missing


def _common(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The entries every dict has with the same value."""
    return {k: v for k, v in dicts[0].items() if all(d.get(k) == v for d in dicts[1:])}


def merge(paths: list[Path], out: Path, allow_partial: bool = False) -> BatchResult:
    """The merged :class:`BatchResult` of the shards' ``batch.json`` files (not yet written to ``out``)."""
    shards = [(path, load_shard(path)) for path in paths]
    missing = _check_shards(shards, allow_partial)
    seen: dict[str, Path] = {}
    jobs = []
    for path, shard in shards:
        for job in shard.jobs:
            if job.name in seen:
                raise ManifestError(f"{path}: job {job.name!r} is also in {seen[job.name]}: the shards overlap")
            seen[job.name] = path
            for attr in ("bundle", "log"):
                value = getattr(job, attr)
                if value is not None:
                    setattr(job, attr, os.path.relpath(path.parent.resolve() / value, out.resolve()))
            jobs.append(job)
    first = shards[0][1]
    records = [ShardRecord(source=os.path.relpath(path.resolve(), out.resolve()), shard=s.shard or "1/1",
                           manifest_sha256=s.manifest_sha256, date=s.date, machine=s.machine, versions=s.versions,
                           wall_s=s.wall_s) for path, s in sorted(shards, key=lambda item: _share(item[1]))]
    merged = BatchResult(manifest=" + ".join(sorted({s.manifest for _, s in shards})),
                         manifest_sha256=first.manifest_sha256, date=min(s.date for _, s in shards),
                         machine=_common([s.machine for _, s in shards]),
                         versions=_common([s.versions for _, s in shards]),
                         parallel_jobs=max(s.parallel_jobs for _, s in shards), shard="merged",
                         cadence=first.cadence, wall_s=max(s.wall_s for _, s in shards), fail_on=first.fail_on,
                         baseline=first.baseline, shards=records, missing_shards=missing,
                         jobs=sorted(jobs, key=lambda j: j.name))
    return merged.finish()
