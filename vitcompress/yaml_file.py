"""Reading the small YAML files that configure vitcompress (recipes, ``--space`` files): a safe loader that refuses
duplicate keys, limits on size and on alias expansion, and each problem one :class:`RecipeError` naming the file
(and the line and column of bad YAML).

A leaf: PyYAML and the error types only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitcompress.errors import RecipeError

MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_VALUES = 100_000


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where a recipe gains nothing from YAML's freedom: a key given twice is an
    error (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: Path, what: str) -> Any:
    """Parse a small YAML file that configures vitcompress (a recipe, a search space) with :class:`RecipeLoader`;
    each problem is a :class:`RecipeError` naming ``what`` and the file, and the line and column of bad YAML."""
    if not path.is_file():
        raise RecipeError(f"{what} {path} is not a file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} {path} is {size / 1e6:.1f} MB: a {what.lstrip('-')} is a small YAML file (at "
                          f"most {MAX_RECIPE_BYTES // 1_000_000} MB)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    if _expanded_size(data, {}) > MAX_RECIPE_VALUES:
        raise RecipeError(f"{path}: its YAML aliases (*name) expand to more than {MAX_RECIPE_VALUES:,} values "
                          "(a 'billion laughs' file?)")
    return data


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """How many values ``value`` holds once YAML aliases are expanded (shared objects counted each time they
    appear), computed once per distinct object, so a "billion laughs" file is measured without expanding it."""
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) not in memo:
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(value)]
