"""The progress interface of long work (stage boundaries, per-step progress), and its ``logging`` implementation.

The library reports progress through a :class:`Progress` object; the CLI passes a rich implementation,
Python users get :class:`LogProgress` (standard ``logging``) unless they pass their own.

A leaf: the standard library only.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("vitcompress")


class Progress(Protocol):
    """Receives stage boundaries and per-step progress of long work."""

    def stage(self, name: str, description: str) -> None: ...

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None: ...

    def finish(self, task: str) -> None: ...


class LogProgress:
    """Progress through ``logging``: stage starts, then every tenth of a task."""

    def __init__(self) -> None:
        self._tasks: dict[str, list[int]] = {}

    def stage(self, name: str, description: str) -> None:
        log.info("[%s] %s", name, description)

    def start(self, task: str, total: int) -> None:
        self._tasks[task] = [0, total]

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None:
        done, total = self._tasks[task]
        self._tasks[task][0] = done + amount
        if total and (done + amount) * 10 // total != done * 10 // total:
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            log.info("%s %d/%d %s", task, done + amount, total, extra)

    def finish(self, task: str) -> None:
        self._tasks.pop(task, None)
