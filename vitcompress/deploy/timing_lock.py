"""One latency measurement at a time on a machine: a file lock around every timed onnxruntime run.

``vitcompress batch`` runs conversions in parallel, but two jobs timing their models at once would slow each
other down and report worse latency than either gets alone. The batch runner sets :data:`LOCK_ENV` to a lock
file shared by its jobs; every latency measurement of the pipeline then holds that lock (``filelock``), and the
time a job waited for it and held it is appended, one JSON line per measurement, to the file named by
:data:`WAITS_ENV`, which the runner reads into ``batch.json``. Without :data:`LOCK_ENV` nothing is locked.

A leaf module: the standard library and filelock only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

from filelock import FileLock

LOCK_ENV = "VITCOMPRESS_LATENCY_LOCK"
WAITS_ENV = "VITCOMPRESS_LATENCY_WAITS"


@contextlib.contextmanager
def latency_lock(what: str) -> Iterator[None]:
    """Hold the machine's latency lock (when :data:`LOCK_ENV` names one) while timing ``what``."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        yield
        return
    asked = time.monotonic()
    with FileLock(path):
        got = time.monotonic()
        try:
            yield
        finally:
            record = {"what": what, "waited_s": round(got - asked, 3), "held_s": round(time.monotonic() - got, 3)}
            waits = os.environ.get(WAITS_ENV)
            if waits:
                with open(waits, "a", encoding="utf-8") as file:
                    file.write(json.dumps(record) + "\n")
