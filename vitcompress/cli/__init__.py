"""Command line: a thin click + rich layer over :mod:`vitcompress.api`, one module per group of commands.

:mod:`.main` holds the ``vitcompress`` group, :mod:`.common` the error/exit policy every command shares,
:mod:`.convert`, :mod:`.bundle` and :mod:`.batch` the commands, :mod:`.render` their console tables. torch and
the pipeline are imported inside the commands, so that ``--help`` answers at once.
"""

from vitcompress.cli.common import CRASH_EXIT_CODE
from vitcompress.cli.main import main

__all__ = ["CRASH_EXIT_CODE", "main"]
