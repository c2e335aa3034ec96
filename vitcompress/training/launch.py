"""``vitcompress convert --nproc N``: start the same command in N processes with torchrun's own launcher.

No launcher of our own: :func:`torch.distributed.run.run` (what the ``torchrun`` script calls) starts the
workers on this machine (``--standalone`` rendezvous), watches them, and stops them all when one fails. Each
worker that fails writes its one ``error:`` line to the error file torchrun gives it
(``TORCHELASTIC_ERROR_FILE``, the format of torch.distributed.elastic's ``ProcessFailure``); the launcher prints
the line of the rank that failed first — not the ones that failed only because their peers were gone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

from vitcompress.deploy.cpus import available_cpus

#: Set in the workers of ``--nproc``: the launcher, not each worker, prints the error line.
LAUNCHED_ENV = "VITCOMPRESS_LAUNCHED"


def in_worker() -> bool:
    """Whether this process is one of several of a torchrun job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def worker_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def record_failure(line: str, secondary: bool, exit_code: int) -> None:
    """Write this worker's error line and exit code where torchrun's agent reads it; ``secondary``: the error
    only followed from another rank's failure (a broken collective). The code is kept because torchrun may stop
    this worker with SIGTERM between the write and its exit (when a peer it broke exits first)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            json.dump({"message": line, "timestamp": int(time.time()),
                       "vitcompress": {"time": time.time(), "secondary": secondary,
                                       "exit_code": exit_code}}, file)


def is_collective_failure(exc: BaseException) -> bool:
    """An error of torch.distributed's transport (a peer went away), not a problem of this rank's own."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(mark in text for mark in ("Connection closed by peer", "gloo",
                                                                             "NCCL", "Connection reset"))


def launch(nproc: int, argv: Sequence[str],
           program: Sequence[str] = ("--module", "vitcompress")) -> tuple[int, str | None]:
    """Run ``python -m vitcompress ARGV`` (or another ``program``: a script) in ``nproc`` processes; returns
    (exit code, the error line to print). The processes share the cores: ``OMP_NUM_THREADS`` = cores / nproc
    unless set (the CPUs this process may use: affinity and cgroup quota)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    os.environ[LAUNCHED_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // nproc)))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), *program, *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        return _first_failure(exc)
    return 0, None


def _first_failure(exc) -> tuple[int, str | None]:
    """Exit code and line of the failure to report: the earliest that was not caused by another."""
    def key(item):
        data = item[1].error_file_data.get("vitcompress", {}) if isinstance(item[1].error_file_data, dict) else {}
        return (bool(data.get("secondary", True)), data.get("time", float("inf")), item[0])

    rank, failure = min(exc.failures.items(), key=key)
    recorded = failure.error_file_data.get("vitcompress") if isinstance(failure.error_file_data, dict) else None
    if recorded and isinstance(failure.message, str):
        return int(recorded.get("exit_code", failure.exitcode)), failure.message
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return code, f"rank {rank} ended with exit code {failure.exitcode} ({failure.message})"
