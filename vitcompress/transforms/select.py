"""Module selection for ``targets`` / ``ignore``.

A selector is an exact module name (``blocks.0.mlp.fc1``), a glob (``blocks.*.mlp.fc1``), a regular
expression prefixed with ``re:`` (``re:blocks\\.\\d+\\.mlp\\.fc[12]``, full match, as in llm-compressor), or a
module class name (``Linear``). Every selector must match at least one module: a typo is an error, never a
silent no-op.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING

from vitcompress.errors import TargetError

if TYPE_CHECKING:
    from torch import nn


def _matches(selector: str, name: str, module: nn.Module) -> bool:
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    if any(ch in selector for ch in "*?["):
        return fnmatch.fnmatchcase(name, selector)
    return name == selector or type(module).__name__ == selector


def select_modules(
    model: nn.Module, targets: list[str], ignore: list[str], kinds: tuple[type[nn.Module], ...], step: str
) -> list[tuple[str, nn.Module]]:
    """Modules of one of ``kinds`` matched by ``targets`` minus ``ignore``, in model order.

    Raises :class:`TargetError` naming the selector when a target or ignore selector matches nothing,
    a target matches only modules of another kind, or a regex does not compile.
    """
    for selector in [*targets, *ignore]:
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as exc:
                raise TargetError(f"{step}: selector {selector!r} is not a valid regex: {exc}") from None
    named = [(n, m) for n, m in model.named_modules() if n]
    kind_names = " or ".join(k.__name__ for k in kinds)
    chosen: dict[str, nn.Module] = {}
    for selector in targets:
        hits = [(n, m) for n, m in named if _matches(selector, n, m)]
        if not hits:
            raise TargetError(f"{step}: target {selector!r} matches no module of the model")
        usable = [(n, m) for n, m in hits if isinstance(m, kinds)]
        if not usable:
            raise TargetError(
                f"{step}: target {selector!r} matches {hits[0][0]} ({type(hits[0][1]).__name__}), not a {kind_names}"
            )
        chosen.update(usable)
    for selector in ignore:
        hits = [n for n, m in named if _matches(selector, n, m)]
        if not hits:
            raise TargetError(f"{step}: ignore {selector!r} matches no module of the model")
        for n in hits:
            chosen.pop(n, None)
    if not chosen:
        raise TargetError(f"{step}: ignore removes every target; nothing left to convert")
    return [(n, m) for n, m in named if n in chosen]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
