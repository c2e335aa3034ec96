"""Reading a ``sensitivity.json`` (``vitcompress sensitivity``) for report.html's block × step heat map.

``convert --sensitivity FILE`` copies the file into the bundle as ``sensitivity.json`` (listed in SHA256SUMS), and
``vitcompress report BUNDLE`` draws the heat map from the bundle's copy, or from ``--sensitivity FILE``. The typed
:class:`~vitcompress.sensitivity_map.Sensitivity` lives with the command that writes it; this leaf imports it only
when a file is read, so the page needs torch only for a heat map.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from vitcompress.errors import UsageError

if TYPE_CHECKING:
    from vitcompress.sensitivity_map import Sensitivity

SENSITIVITY = "sensitivity.json"


def read_sensitivity(path: str | Path) -> "Sensitivity":
    """The validated contents of ``path``; a missing, unreadable or invalid file is a UsageError naming it."""
    from vitcompress.sensitivity_map import Sensitivity

    try:
        return Sensitivity.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise UsageError(f"--sensitivity {path}: cannot read it ({exc.strerror})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise UsageError(f"--sensitivity {path} is not a vitcompress sensitivity.json: {where}: {first['msg']}") \
            from None
