"""Module selection for ``targets`` / ``ignore``.

A selector is one of (docs/recipes.md, "Selectors"):

- an exact module name (``blocks.0.mlp.fc1``), a glob (``blocks.*.mlp.fc1``), a regular expression prefixed with
  ``re:`` (``re:blocks\\.\\d+\\.mlp\\.fc[12]``, full match, as in llm-compressor), or a module class name
  (``Linear``);
- a **role**, ``role:<role>`` with ``<role>`` one of :data:`ROLES` (``role:mlp.fc1``, ``role:attn.qkv``): the
  Linears that play that part in every transformer block, found through the model family's module names
  (:data:`FAMILIES`), so ``role:mlp.fc1`` is ``blocks.N.mlp.fc1`` on a ViT, ``layers.N.blocks.M.mlp.fc1`` on a
  Swin and ``blocks.N.mlp.fc1_g``/``fc1_x`` on a SwiGLU EVA;
- a **relative depth**, ``blocks[<positions>]`` optionally followed by ``.<path>`` (``blocks[-1].attn``,
  ``blocks[-2:].mlp.fc1``, ``blocks[0.5:]``), or a role limited to those blocks (``role:mlp.fc1[-3:]``). The
  blocks are the model's transformer blocks in depth order, across the stages of a hierarchical model.
  ``<positions>`` is an index (``0``, ``-1``: the last block) or a slice ``start:end`` (end excluded) whose bounds
  are indices or fractions of the depth D (``0.5:`` is the second half: fraction f is block ⌊f·D⌋).

Every selector must match at least one module: a typo is an error, never a silent no-op. The syntax is checked
when the recipe is read (:func:`check_selector`, no torch); matching needs the model (:func:`resolve`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitcompress.errors import TargetError

if TYPE_CHECKING:
    from torch import nn

ROLE_PREFIX = "role:"
BLOCKS_PREFIX = "blocks["

#: The roles a ``role:`` selector names, and what each is.
ROLES: dict[str, str] = {
    "mlp.fc1": "the MLP's input Linear(s) (SwiGLU: both the gate and the value Linear)",
    "mlp.fc2": "the MLP's output Linear",
    "attn.qkv": "the attention's input projection(s): fused qkv, or q and kv, or q, k and v",
    "attn.proj": "the attention's output projection",
}

_STANDARD: dict[str, tuple[str, ...]] = {
    "mlp.fc1": ("mlp.fc1",), "mlp.fc2": ("mlp.fc2",), "attn.qkv": ("attn.qkv",), "attn.proj": ("attn.proj",)}


@dataclass(frozen=True)
class Family:
    """A timm model family: the model classes it covers, where its blocks are (for the docs) and, per role, the
    names of the role's Linears relative to a block."""

    name: str
    classes: tuple[str, ...]
    blocks: str
    roles: dict[str, tuple[str, ...]]


#: Role names per timm family (inspected with ``timm.create_model(name, pretrained=False)``, timm 1.0).
FAMILIES: tuple[Family, ...] = (
    Family("vision_transformer (ViT, DeiT, DeiT III, vit_fmnist)", ("VisionTransformer", "VisionTransformerDistilled"),
           "blocks.N", _STANDARD),
    Family("eva (EVA, EVA-02)", ("Eva",), "blocks.N",
           {"mlp.fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"), "mlp.fc2": ("mlp.fc2",),
            "attn.qkv": ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.proj": ("attn.proj",)}),
    Family("beit (BEiT, BEiT v2)", ("Beit",), "blocks.N", _STANDARD),
    Family("swin (Swin, Swin V2)", ("SwinTransformer", "SwinTransformerV2"), "layers.N.blocks.M", _STANDARD),
    Family("pvt_v2", ("PyramidVisionTransformerV2",), "stages.N.blocks.M",
           {**_STANDARD, "attn.qkv": ("attn.q", "attn.kv")}),
    Family("mvitv2", ("MultiScaleVit",), "stages.N.blocks.M", _STANDARD),
    Family("cait", ("Cait",), "blocks.N (the class-attention blocks_token_only are not counted)", _STANDARD),
)

#: Any other model: blocks are the modules named ``…blocks.N``, roles every name a family above uses.
GENERIC = Family("any other model", (), "…blocks.N", {
    role: tuple(dict.fromkeys(n for family in FAMILIES for n in family.roles[role])) for role in ROLES})

_BLOCK_NAME = re.compile(r"(?:.*\.)?blocks\.\d+")
_INDEX = r"-?\d+"
_FRACTION = r"\d*\.\d+|\d+\.\d*"
_BOUND = re.compile(rf"(?P<fraction>{_FRACTION})|(?P<index>{_INDEX})")
_PATH = re.compile(r"[A-Za-z0-9_*?]+(?:\.[A-Za-z0-9_*?]+)*")
POSITIONS_HELP = "an index (0, -1: the last block) or a slice start:end of indices or depth fractions (-3:, 0.5:)"


@dataclass(frozen=True)
class Positions:
    """Block positions ``[start:end]`` (or one ``index``); a bound is an int index or a float fraction of the depth."""

    text: str
    index: int | None = None
    start: int | float | None = None
    end: int | float | None = None

    def blocks(self, depth: int, selector: str) -> list[int]:
        """The positions of the selected blocks on a model ``depth`` blocks deep (a :class:`TargetError` when an
        index lies outside it or nothing is selected)."""
        if self.index is not None:
            if not -depth <= self.index < depth:
                raise TargetError(f"selector {selector!r}: block {self.index} is outside the model's {depth} blocks "
                                  f"(0..{depth - 1}, or -{depth}..-1 from the end)")
            return [self.index % depth]
        chosen = range(self._bound(self.start, depth, 0, selector), self._bound(self.end, depth, depth, selector))
        if not chosen:
            raise TargetError(f"selector {selector!r}: [{self.text}] selects no block of the model's {depth}")
        return list(chosen)

    @staticmethod
    def _bound(bound: float | None, depth: int, default: int, selector: str) -> int:
        if bound is None:
            return default
        if isinstance(bound, float):
            return math.floor(bound * depth + 1e-9)  # ⌊f·D⌋, not one lower where f·D rounds below an integer
        if not -depth <= bound <= depth:
            raise TargetError(f"selector {selector!r}: bound {bound} is outside the model's {depth} blocks")
        return bound % depth if bound < 0 else bound


@dataclass(frozen=True)
class Selector:
    """A parsed selector: ``kind`` is name (exact name or class name), glob, regex, role or blocks."""

    text: str
    kind: str
    pattern: str = ""
    role: str | None = None
    positions: Positions | None = None

    @property
    def is_model_relative(self) -> bool:
        """Whether the modules it means depend on the model's family or depth (a role or relative selector)."""
        return self.kind in ("role", "blocks")


def _positions(text: str, selector: str) -> Positions:
    bad = f"selector {selector!r}: [{text}] is not {POSITIONS_HELP}"
    text = text.strip()
    if re.fullmatch(_INDEX, text):
        return Positions(text, index=int(text))
    if text.count(":") != 1:
        raise TargetError(bad)
    bounds: list[int | float | None] = []
    for part in (p.strip() for p in text.split(":")):
        match = _BOUND.fullmatch(part)
        if not part:
            bounds.append(None)
        elif match is None:
            raise TargetError(bad)
        elif match["fraction"] is not None:
            value = float(part)
            if not 0 <= value <= 1:
                raise TargetError(f"selector {selector!r}: fraction {part} is outside 0..1 (a share of the depth)")
            bounds.append(value)
        else:
            bounds.append(int(part))
    return Positions(text, start=bounds[0], end=bounds[1])


def _split_positions(body: str, selector: str) -> tuple[str, str | None, str]:
    """``head[positions]rest`` → (head, positions, rest); (body, None, "") without brackets."""
    if "[" not in body and "]" not in body:
        return body, None, ""
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\]([^\[\]]*)", body)
    if match is None:
        raise TargetError(f"selector {selector!r}: unbalanced or repeated [ ]; positions are one [{POSITIONS_HELP}]")
    return match[1], match[2], match[3]


def parse_selector(selector: str) -> Selector:
    """Parse one selector strictly (no torch, no model): a :class:`TargetError` says what is wrong with it."""
    if not isinstance(selector, str) or not selector.strip():
        raise TargetError(f"selector {selector!r}: empty")
    if selector != selector.strip():
        raise TargetError(f"selector {selector!r}: leading or trailing spaces")
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as exc:
            raise TargetError(f"selector {selector!r} is not a valid regex: {exc}") from None
        return Selector(selector, "regex", selector[3:])
    if selector.startswith(ROLE_PREFIX):
        role, positions, rest = _split_positions(selector[len(ROLE_PREFIX):], selector)
        if role not in ROLES:
            raise TargetError(f"selector {selector!r}: unknown role {role!r} (roles: {', '.join(ROLES)}; "
                              "a role may end in block positions, e.g. role:mlp.fc1[-3:])")
        if rest:
            raise TargetError(f"selector {selector!r}: nothing may follow the block positions of a role")
        return Selector(selector, "role", role=role,
                        positions=None if positions is None else _positions(positions, selector))
    if selector.startswith(BLOCKS_PREFIX):
        _, positions, rest = _split_positions(selector, selector)
        if rest and (not rest.startswith(".") or not _PATH.fullmatch(rest[1:])):
            raise TargetError(f"selector {selector!r}: after blocks[…] comes nothing or .<path> (a module path "
                              "under each block, * and ? allowed: blocks[-1].attn, blocks[-2:].mlp.*)")
        return Selector(selector, "blocks", rest[1:], positions=_positions(positions or "", selector))
    if ":" in selector.split(".")[0] and not selector.startswith("re:"):
        raise TargetError(f"selector {selector!r}: unknown prefix {selector.split(':')[0]!r}: (use re: or role:)")
    if any(ch in selector for ch in "*?["):
        return Selector(selector, "glob", selector)
    return Selector(selector, "name", selector)


def check_selector(selector: str) -> str:
    """``selector`` if it parses (for the recipe schema: the error becomes the key path's message)."""
    try:
        parse_selector(selector)
    except TargetError as exc:
        raise ValueError(str(exc)) from None
    return selector


def blocks_needed(selector: str) -> int:
    """The fewest blocks a model needs for this selector to mean what it says: one more than its highest fixed
    block index (``blocks.11``, ``blocks\\.11``), k for ``blocks[-k]``/``[-k:]``, i+1 for ``[i]``/``[i:]``."""
    try:
        parsed = parse_selector(selector)
    except TargetError:
        parsed = None
    if parsed is None or parsed.positions is None:
        return max((int(i) + 1 for i in re.findall(r"blocks\\?\.(\d+)", selector)), default=0)
    p = parsed.positions
    need = 1
    for bound, is_end in ((p.index, False), (p.start, False), (p.end, True)):
        if isinstance(bound, int):
            if is_end:
                need = max(need, bound if bound >= 0 else 1 - bound)
            else:
                need = max(need, bound + 1 if bound >= 0 else -bound)
    return need


def family_of(model: nn.Module) -> Family:
    """The family whose table names the roles of ``model`` (by its class), :data:`GENERIC` for any other."""
    name = type(model).__name__
    return next((f for f in FAMILIES if name in f.classes), GENERIC)


def model_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks in depth order: the modules named ``…blocks.N`` (``blocks.3``,
    ``layers.1.blocks.0``), not counting a block inside another."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if _BLOCK_NAME.fullmatch(name) and not any(name.startswith(b + ".") for b in found):
            found.append(name)
    return found


def resolve(model: nn.Module, selector: str, named: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Names of the modules of ``model`` that ``selector`` matches, in model order (possibly none; a
    :class:`TargetError` for a malformed selector or positions outside the model)."""
    parsed = parse_selector(selector)
    named = named if named is not None else [(n, m) for n, m in model.named_modules() if n]
    if parsed.kind == "regex":
        rx = re.compile(parsed.pattern)
        return [n for n, _ in named if rx.fullmatch(n)]
    if parsed.kind == "glob":
        return [n for n, _ in named if fnmatch.fnmatchcase(n, parsed.pattern)]
    if parsed.kind == "name":
        return [n for n, m in named if n == selector or type(m).__name__ == selector]
    blocks = model_blocks(model)
    if not blocks:
        raise TargetError(f"selector {selector!r}: the model ({type(model).__name__}) has no transformer blocks "
                          "(modules named …blocks.N); use names, globs or re: selectors")
    if parsed.positions is not None:
        blocks = [blocks[i] for i in parsed.positions.blocks(len(blocks), selector)]
    if parsed.kind == "blocks":
        wanted = [(b, f"{b}.{parsed.pattern}" if parsed.pattern else b) for b in blocks]
        return [n for n, _ in named if any(n == w or fnmatch.fnmatchcase(n, w) for _, w in wanted)]
    leaves = family_of(model).roles[parsed.role or ""]
    wanted_names = {f"{b}.{leaf}" for b in blocks for leaf in leaves}
    return [n for n, _ in named if n in wanted_names]


def concrete(model: nn.Module, selectors: list[str], what: str) -> list[str]:
    """``selectors`` with each role or relative-depth selector replaced by the exact names it matches on
    ``model`` (a :class:`TargetError` when one matches nothing); names, globs, regexes and class names are kept as
    written (their step checks them when it runs, with its own errors)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    out: list[str] = []
    for selector in selectors:
        if not parse_selector(selector).is_model_relative:
            out.append(selector)
            continue
        hits = resolve(model, selector, named)
        if not hits:
            raise TargetError(f"{what} {selector!r} matches no module of the model{_role_hint(model, selector)}")
        out += hits
    return list(dict.fromkeys(out))


def _role_hint(model: nn.Module, selector: str) -> str:
    parsed = parse_selector(selector)
    if parsed.kind != "role":
        return ""
    family = family_of(model)
    return (f" (a {type(model).__name__}, family {family.name}: looked for "
            f"{', '.join(f'<block>.{leaf}' for leaf in family.roles[parsed.role or ''])})")


def select_modules(
    model: nn.Module, targets: list[str], ignore: list[str], kinds: tuple[type[nn.Module], ...], step: str
) -> list[tuple[str, nn.Module]]:
    """Modules of one of ``kinds`` matched by ``targets`` minus ``ignore``, in model order.

    Raises :class:`TargetError` naming the selector when a target or ignore selector matches nothing,
    a target matches only modules of another kind, or a selector is malformed.
    """
    for selector in [*targets, *ignore]:
        try:
            parse_selector(selector)
        except TargetError as exc:
            raise TargetError(f"{step}: {exc}") from None
    named = [(n, m) for n, m in model.named_modules() if n]
    modules = dict(named)
    kind_names = " or ".join(k.__name__ for k in kinds)
    chosen: dict[str, nn.Module] = {}
    for selector in targets:
        hits = [(n, modules[n]) for n in _resolve_in_step(model, selector, named, step)]
        if not hits:
            raise TargetError(f"{step}: target {selector!r} matches no module of the model"
                              f"{_role_hint(model, selector)}")
        usable = [(n, m) for n, m in hits if isinstance(m, kinds)]
        if not usable:
            raise TargetError(
                f"{step}: target {selector!r} matches {hits[0][0]} ({type(hits[0][1]).__name__}), not a {kind_names}"
            )
        chosen.update(usable)
    for selector in ignore:
        hits = _resolve_in_step(model, selector, named, step)
        if not hits:
            raise TargetError(f"{step}: ignore {selector!r} matches no module of the model")
        for n in hits:
            chosen.pop(n, None)
    if not chosen:
        raise TargetError(f"{step}: ignore removes every target; nothing left to convert")
    return [(n, m) for n, m in named if n in chosen]


def _resolve_in_step(model: nn.Module, selector: str, named: list[tuple[str, nn.Module]], step: str) -> list[str]:
    try:
        return resolve(model, selector, named)
    except TargetError as exc:
        raise TargetError(f"{step}: {exc}") from None


def select_linears(model: nn.Module, targets: list[str], ignore: list[str], step: str) -> list[tuple[str, nn.Module]]:
    """The ``nn.Linear`` modules ``targets`` minus ``ignore`` select (:func:`select_modules`), each made to run
    through its own ``forward``: a fused ``qkv`` whose attention applies it with ``F.linear(x, qkv.weight,
    cat(q_bias, k_bias, v_bias))`` (BEiT, EVA, Swin V2) gets those biases as its own bias (the same function),
    so a replacement module takes effect and calibration hooks see its inputs."""
    from torch import nn

    targets_found = select_modules(model, targets, ignore, (nn.Linear,), step)
    for name, linear in targets_found:
        fold_qkv_bias(model, name, linear)
    return targets_found


def fold_qkv_bias(model: nn.Module, name: str, linear: nn.Module) -> bool:
    """Move an attention's separate q/k/v biases into its fused ``qkv`` Linear at ``name`` (``True`` if it did):
    timm's BEiT, EVA and Swin V2 attentions call ``F.linear(x, self.qkv.weight, bias)`` while ``q_bias`` is set,
    and ``self.qkv(x)`` once it is None, so the function is unchanged."""
    import torch
    from torch import nn

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    q_bias = getattr(parent, "q_bias", None)
    if child != "qkv" or not isinstance(q_bias, torch.Tensor) or getattr(parent, "qkv", None) is not linear:
        return False
    k_bias = getattr(parent, "k_bias", None)
    v_bias = getattr(parent, "v_bias", None)
    with torch.no_grad():
        k_bias = torch.zeros_like(q_bias) if k_bias is None else k_bias
        v_bias = torch.zeros_like(q_bias) if v_bias is None else v_bias
        bias = torch.cat((q_bias, k_bias, v_bias)).detach().clone()
        if linear.bias is not None:
            bias += linear.bias
    linear.bias = nn.Parameter(bias, requires_grad=q_bias.requires_grad)
    for attr in ("q_bias", "k_bias", "v_bias"):
        if hasattr(parent, attr):
            setattr(parent, attr, None)
    return True


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
