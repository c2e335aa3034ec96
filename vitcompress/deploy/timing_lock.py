"""One latency measurement at a time on a machine: a file lock around every timed onnxruntime run.

Two processes timing their models at once slow each other down and both report worse latency than either gets
alone: two ``vitcompress convert`` started by hand, a ``vitcompress batch`` running jobs in parallel, a plan
timing its kernels beside a conversion. Every latency measurement of the package (validation, the cascade, the
profile, the MoE's ``latency_weights: measure``, attention skip's ``latency_budget_ms``, the planner's int8
kernel costs, ``vitcompress profile``) therefore holds one machine-wide lock (``filelock``):
:data:`DEFAULT_LOCK` under the system's temporary directory, or the file :data:`LOCK_ENV` names (the batch runner
sets it to its own lock). Not platformdirs' user runtime folder (``/run/user/UID``): that one is each user's own,
and two users timing on one machine slow each other down just the same. The lock is re-entrant within a process (one :class:`~filelock.FileLock` per path), so a
timed call inside another holds it once. When :data:`WAITS_ENV` names a file, the time each measurement waited for
the lock and held it is appended there, one JSON line each, which the batch runner reads into ``batch.json``.

A leaf module: the standard library and filelock only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

LOCK_ENV = "VITCOMPRESS_LATENCY_LOCK"
WAITS_ENV = "VITCOMPRESS_LATENCY_WAITS"
#: The machine's latency lock when :data:`LOCK_ENV` names none: one file for every user's processes.
DEFAULT_LOCK = Path(tempfile.gettempdir()) / "vitcompress-latency.lock"


def lock_path() -> Path:
    """The lock file this process times under: :data:`LOCK_ENV`'s, else :data:`DEFAULT_LOCK`."""
    return Path(os.environ.get(LOCK_ENV) or DEFAULT_LOCK)


@contextlib.contextmanager
def latency_lock(what: str) -> Iterator[None]:
    """Hold the machine's latency lock while timing ``what`` (re-entrant: a nested hold is free)."""
    lock = FileLock(lock_path(), mode=0o666, is_singleton=True)
    asked = time.monotonic()
    with lock:
        got = time.monotonic()
        try:
            yield
        finally:
            record = {"what": what, "waited_s": round(got - asked, 3), "held_s": round(time.monotonic() - got, 3)}
            waits = os.environ.get(WAITS_ENV)
            if waits:
                with open(waits, "a", encoding="utf-8") as file:
                    file.write(json.dumps(record) + "\n")
