"""vitcompress: turn a pretrained Vision Transformer into a faster one that gives the same answers.

Public API (imported lazily so that the CLI's ``--help`` does not pay for torch)::

    from vitcompress import convert, plan, load_recipe, apply_recipe, export_onnx, load_model
"""

from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "convert": "vitcompress.api",
    "apply_recipe": "vitcompress.api",
    "plan": "vitcompress.planner",
    "load_recipe": "vitcompress.recipe",
    "export_onnx": "vitcompress.export",
    "load_model": "vitcompress.models",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")
