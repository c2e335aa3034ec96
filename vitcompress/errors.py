"""Errors that vitcompress raises on bad input or failed checks.

Every user-facing problem is a :class:`VitCompressError`; the CLI prints its message on one line and exits
with :attr:`VitCompressError.exit_code` (2 for bad input, 1 for a failed validation gate).
"""

from __future__ import annotations


class VitCompressError(Exception):
    """Base class: a problem the user can fix, described in one line (line breaks in the message, e.g. from a
    YAML parser's or onnxruntime's own text, are folded into spaces)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class RecipeError(VitCompressError):
    """A recipe file or `--set` override is malformed, names unknown keys or holds out-of-range values."""


class TargetError(VitCompressError):
    """A transform selector matches no module, or matches a module the transform cannot convert."""


class ModelError(VitCompressError):
    """Unknown model name, missing/corrupt checkpoint, or a checkpoint for another architecture."""


class DataError(VitCompressError):
    """A dataset is missing, unreadable or empty."""


class OutputError(VitCompressError):
    """The output directory cannot be used (exists without --force, not writable)."""


class ExportError(VitCompressError):
    """ONNX export failed or the exported graph does not run in onnxruntime as declared."""


class GateError(VitCompressError):
    """A validation gate of the recipe (accuracy drop, agreement, parity) failed."""

    exit_code = 1


class UsageError(VitCompressError):
    """Options that cannot be used together, or a value out of range for the model at hand."""


class ResumeError(VitCompressError):
    """``--resume`` cannot continue: no checkpoint, or one of a different recipe, model, data or process count."""
