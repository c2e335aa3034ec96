"""How every command ends and reports: the error/exit policy, the rich progress, and the shared source options.

Every :class:`~vitcompress.errors.VitCompressError` becomes one ``error:`` line and its exit code (2 for bad
input, 1 for a failed validation gate); Ctrl-C exits 130, SIGTERM 143; an unexpected exception is one line naming
a traceback log and exit code :data:`CRASH_EXIT_CODE`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True)
#: Exit code of an unexpected exception (sysexits' EX_SOFTWARE): not 1 (a failed gate), not 2 (bad input).
CRASH_EXIT_CODE = 70
RECIPE_HELP = "recipe YAML file, or a shipped recipe by name (e.g. svd; list: vitcompress recipes)"


def source_options(
    *,
    checkpoint_help: str = "weights: .safetensors, .pth or .pt",
    data_help: str = "fmnist, synthetic, or an image directory (DIR/<class>/*, or DIR/train + DIR/val)",
    set_help: str = "override a recipe value, e.g. finetune.steps=50",
    random_init_help: str = "random weights, for latency-only work (stated in the report)",
    model_arg_help: str | None = None,
) -> Callable[[F], F]:
    """The options that say which weights, recipe and data a command starts from, as ``convert``, ``plan`` and
    ``batch remeasure`` share them: ``--recipe``, ``--checkpoint``, ``--data``, ``--set`` and ``--random-init``,
    plus ``--model-arg`` when ``model_arg_help`` is given. Each command words the help for its own use.

    The command receives them as ``recipe_path``, ``checkpoint``, ``data``, ``overrides``, ``random_init`` and
    ``model_arg_items``."""
    options = [
        click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path), help=RECIPE_HELP),
        click.option("--checkpoint", type=click.Path(path_type=Path), help=checkpoint_help),
        click.option("--data", help=data_help),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=set_help),
        click.option("--random-init", is_flag=True, help=random_init_help),
    ]
    if model_arg_help is not None:
        options.append(click.option("--model-arg", "model_arg_items", multiple=True, metavar="NAME=VALUE",
                                    help=model_arg_help))

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


class RichProgress:
    """The library's progress interface drawn with rich: one line per stage, a live bar per long task.

    Without a terminal (CI logs, pipes) there are no bars, only the stage lines and one line per finished task.
    """

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.last_info: dict[str, str] = {}

    def stage(self, name: str, description: str) -> None:
        console.print(f"[bold cyan]{name:>9}[/] {escape(description)}", highlight=False)

    def start(self, task: str, total: int) -> None:
        if self.progress is not None:
            self.tasks[task] = self.progress.add_task(task, total=total, info="")

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k.replace('_', '/')} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in fields.items())
        self.last_info[task] = info
        if self.progress is not None:
            self.progress.update(self.tasks[task], advance=amount, info=info)

    def finish(self, task: str) -> None:
        if self.progress is not None:
            self.progress.remove_task(self.tasks.pop(task))
        if self.last_info.get(task):
            console.print(f"{'':>9} {task} done: {self.last_info.pop(task)}", highlight=False)


def progress_bars() -> contextlib.AbstractContextManager[Progress | None]:
    """Live bars for the long tasks in a terminal (entered: a :class:`Progress`); elsewhere none (``None``)."""
    if not console.is_terminal:
        return contextlib.nullcontext()
    columns = (TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, transient=True)


def error_line(message: str) -> None:
    """Print ``message`` as the one ``error:`` line on stderr."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _crash_log(exc: BaseException) -> str:
    """Write the full traceback of an unexpected exception to a log file; returns its path (or why not)."""
    path = Path(tempfile.gettempdir()) / f"vitcompress-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError as failed:
        return f"no log: {failed.strerror}"
    return str(path)


#: errno of a write that failed for want of space (ENOSPC, EDQUOT) or over RLIMIT_FSIZE (EFBIG), and how other
#: writers word it in their own exceptions: the Rust and C++ ones (safetensors, onnx) quote the system's message,
#: numpy's ``tofile`` reports a short write ("614400 requested and 499968 written").
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|File too large|\d+ requested and \d+ written")


def disk_full(exc: BaseException) -> str | None:
    """What a failed write says when ``exc`` (or an exception it was raised from) is a full disk or a file size
    limit; None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return f"{seen.strerror}{f' ({seen.filename})' if seen.filename else ''}"
        found = _FULL_TEXT.search(str(seen))
        if found is not None:
            return found.group(0)
        seen = seen.__cause__ or seen.__context__
    return None


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread, so the library's cleanup (``finally``) runs as for Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn every way a command can end badly into one ``error:`` line and a distinct exit code.

    A :class:`VitCompressError` exits with its own code (2 bad input, 1 failed gate); Ctrl-C with 130 and
    SIGTERM with 143, after the library has cleaned up; any other exception is a crash: one line naming a log
    file with the full traceback, exit code :data:`CRASH_EXIT_CODE`, so CI can tell a crash from a failed gate.
    """
    from vitcompress.errors import VitCompressError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except VitCompressError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); nothing was written", 130, quiet_in_worker=True)
    except Terminated:
        _fail("terminated (SIGTERM); nothing was written", 143, quiet_in_worker=True)
    except Exception as exc:
        from vitcompress.training.launch import is_collective_failure

        full = disk_full(exc)
        if full is not None:
            _fail(f"cannot write the output: {full} (the disk is full or a file size limit is set); nothing was "
                  "written: free space or choose another --out", 2)

        detail = (str(exc).strip().splitlines() or [""])[0]
        _fail(f"internal error: {type(exc).__name__}: {detail} (full traceback in {_crash_log(exc)}; "
              "please report it)", CRASH_EXIT_CODE, secondary=is_collective_failure(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int, secondary: bool = False, quiet_in_worker: bool = False) -> None:
    """Print the error line and exit with ``code``. In a torchrun worker the line names the rank and goes to
    torchrun's error file too; under ``convert --nproc`` the launcher prints it (once, for the rank that failed
    first), and a worker stopped by a signal (torchrun stops them all when one fails) prints nothing."""
    from vitcompress.training.launch import LAUNCHED_ENV, in_worker, record_failure, worker_rank

    if in_worker():
        if quiet_in_worker:
            sys.exit(code)
        message = f"rank {worker_rank()}: {message}"
        record_failure(message, secondary, code)
        if os.environ.get(LAUNCHED_ENV):
            sys.exit(code)
    error_line(message)
    sys.exit(code)


class OneLineErrors(click.Group):
    """A click group whose usage errors (unknown option, bad number, missing argument) are one ``error:`` line
    and exit code 2, like every other bad input, instead of click's three-line usage block."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        # the command line as given, for `convert --nproc` to start the same command in every process
        kwargs["obj"] = {"argv": list(args) if args is not None else sys.argv[1:]}
        try:
            code = super().main(args, *rest, **kwargs)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            error_line(exc.format_message() + (f" (see '{context.command_path} --help')" if context else ""))
            sys.exit(exc.exit_code)
        except click.Abort:
            error_line("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)
