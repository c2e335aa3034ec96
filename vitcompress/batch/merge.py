"""``vitcompress batch merge``: join the ``batch.json`` of CI shards into one result.

Each shard's relative bundle and log paths are rewritten relative to the merged folder, so the merged
``junit.xml`` and ``summary.md`` point at the shards' artifacts. A job in two shards is an error (the shards
overlap: different manifests or shard counts).
"""

from __future__ import annotations

import os
from pathlib import Path

from vitcompress.batch.baseline import load_baseline
from vitcompress.batch.manifest import ManifestError
from vitcompress.batch.results import BatchResult


def merge(paths: list[Path], out: Path) -> BatchResult:
    shards = [(path, load_baseline(path)) for path in paths]
    seen: dict[str, Path] = {}
    jobs = []
    for path, shard in shards:
        for job in shard.jobs:
            if job.name in seen:
                raise ManifestError(f"{path}: job {job.name!r} is also in {seen[job.name]}: the shards overlap "
                                    "(same manifest and the same N in every --shard K/N?)")
            seen[job.name] = path
            for attr in ("bundle", "log"):
                value = getattr(job, attr)
                if value is not None:
                    setattr(job, attr, os.path.relpath(path.parent.resolve() / value, out.resolve()))
            jobs.append(job)
    first = shards[0][1]
    manifests = {s.manifest for _, s in shards}
    merged = BatchResult(manifest=" + ".join(sorted(manifests)), date=min(s.date for _, s in shards),
                         machine=first.machine, versions=first.versions,
                         parallel_jobs=max(s.parallel_jobs for _, s in shards),
                         shard=f"merged {len(shards)}: " + ", ".join(s.shard or "all" for _, s in shards),
                         cadence=first.cadence, wall_s=max(s.wall_s for _, s in shards), fail_on=first.fail_on,
                         baseline=first.baseline, jobs=sorted(jobs, key=lambda j: j.name))
    return merged.finish()
