"""Files replaced whole: written to a hidden temporary sibling, then renamed over the target, so a process killed
mid-write never leaves half a file for a reader (a resumed batch, ``vitcompress verify``, a resumed fine-tune).

A leaf module: the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (rename on the same file system)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:  # a full disk, a signal: no temporary file left behind either
        tmp.unlink(missing_ok=True)
        raise
