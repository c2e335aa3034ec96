"""Recipe plugins: import the modules a recipe's ``plugins:`` names, which register third-party transforms.

A plugin is a Python module that defines a :class:`~vitcompress.transforms.registry.TransformConfig` subclass
and registers its function with ``@register(Config)`` when imported. A recipe's top-level ``plugins:`` list
is imported before its steps are validated: each item is a module name (looked up in the recipe file's folder
first, then on ``sys.path``) or the path of a ``.py`` file relative to the recipe file. (Installed plugins come
in by entry points instead: :func:`vitcompress.transforms.registry.load_entry_points`.)

A plugin that cannot be imported, or that registers a transform name already taken, is a
:class:`~vitcompress.errors.RecipeError` naming the plugin; it then leaves nothing registered.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from vitcompress.errors import RecipeError
from vitcompress.transforms import registry

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_recipe_plugins(plugins: Any, base_dir: Path, source: str) -> None:
    """Import the recipe's ``plugins:`` (module names or ``.py`` paths, relative to ``base_dir``, the recipe
    file's folder); ``source`` names the recipe in error messages. A module already imported is not run again."""
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p.strip() for p in plugins):
        raise RecipeError(f"{source}: plugins: a list of module names or .py file paths, got {plugins!r}")
    for i, spec in enumerate(plugins):
        where = f"{source}: plugins.{i}"
        try:
            with registry.rollback_on_error():
                if _is_path(spec):
                    _import_file(base_dir / spec, where)
                elif _MODULE_NAME.fullmatch(spec):
                    _import_module(spec, base_dir)
                else:
                    raise RecipeError(f"{where}: {spec!r} is neither a module name nor a .py file path")
        except RecipeError:
            raise
        except registry.TransformNameTaken as exc:
            raise RecipeError(f"{where}: plugin {spec!r} registers {exc}") from None
        except Exception as exc:  # noqa: BLE001 (any failure of the plugin's own code is reported the same way)
            raise RecipeError(f"{where}: cannot import plugin {spec!r}: {type(exc).__name__}: {exc}") from None


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_module(name: str, base_dir: Path) -> ModuleType:
    """Import ``name`` with ``base_dir`` searched first (for this import only)."""
    if name in sys.modules:
        return sys.modules[name]
    folder = str(base_dir.resolve())
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def _import_file(path: Path, where: str) -> ModuleType:
    """Import the ``.py`` file ``path`` as a module of its own (once per file: its name holds a hash of the
    resolved path)."""
    path = path.resolve()
    if not path.is_file():
        raise RecipeError(f"{where}: plugin file {path} does not exist (a relative path starts at the recipe's "
                          "folder)")
    name = f"vitcompress_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_" \
           f"{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RecipeError(f"{where}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
