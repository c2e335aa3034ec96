"""Registry of recipe transforms: each is a pydantic config class plus a function that swaps modules.

The registry is keyed by the config class (as torchao keys its module handlers by config type): a transform
module decorates its function with ``@register(ConfigClass)``, and the transform's name is the default of the
config's ``transform: Literal["..."]`` field. Recipe parsing looks up the config class by a step's
``transform:`` name (:func:`get`), :func:`for_config` finds the function of a config instance. Third-party
transforms register the same way from outside the package: a recipe's ``plugins:`` imports them
(:mod:`vitcompress.plugins`), and installed ``vitcompress.transforms`` entry points are loaded at the first
lookup (:func:`load_entry_points`).

Importing this module, or a built-in transform's, loads no torch: the config classes need only pydantic, and
each handler imports torch and its layers when it runs, so reading a recipe stays light.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vitcompress.errors import RecipeError
from vitcompress.transforms.select import check_selector

if TYPE_CHECKING:
    import torch
    from torch import nn


class TransformConfig(BaseModel):
    """Fields every step has: which modules it converts (``targets``) and which of those it leaves alone."""

    model_config = ConfigDict(extra="forbid")

    keeps_token_count: ClassVar[bool] = True
    """False for a transform that changes the number of tokens (token merging): the final tokens then cannot be
    compared with the original model's, so such a step excludes ``finetune.distill.tokens_mse``."""

    transform: str
    targets: list[str] = Field(min_length=1, description="selectors: exact name, glob, 're:<regex>', class name, "
                               "'role:<role>' or relative depth 'blocks[-1]'")
    ignore: list[str] = Field(default_factory=list, description="selectors removed from the matches")

    @field_validator("targets", "ignore", check_fields=False)
    @classmethod
    def _selectors_parse(cls, selectors: list[str]) -> list[str]:
        """Every selector is well formed (docs/recipes.md, Selectors); whether it matches needs the model."""
        for i, selector in enumerate(selectors):
            try:
                check_selector(selector)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return selectors


ATTENTIONS = ("blocks.*.attn",)
MLP_LINEARS = ("blocks.*.mlp.fc1", "blocks.*.mlp.fc2")


def default_targets(selectors: tuple[str, ...], what: str) -> Any:
    """A ``targets`` field defaulting to ``selectors``, so ``Config()`` converts the natural modules of a ViT."""
    return Field(default_factory=lambda: list(selectors), min_length=1,
                 description=f"selectors: exact name, glob, 're:<regex>', class name, 'role:<role>' or "
                                 f"relative depth 'blocks[-1]'; default {what}")


@dataclass
class TransformInputs:
    """What a transform may need beyond the model: a source of calibration image batches. ``details`` is
    where a transform leaves JSON-able facts for the report (e.g. the scores behind its choices)."""

    calibration_batches: Callable[[], Iterable[torch.Tensor]]
    details: dict[str, Any] = field(default_factory=dict)


class TransformFn(Protocol):
    """A transform's function: converts the modules of ``model`` that ``config`` selects, in place, and returns
    their names."""

    def __call__(self, model: nn.Module, config: TransformConfig, inputs: TransformInputs) -> list[str]: ...


@dataclass(frozen=True)
class Transform:
    """A registered transform: its recipe name, config class, function and one-line description."""

    name: str
    config: type[TransformConfig]
    apply: TransformFn
    doc: str


class TransformNameTaken(ValueError):
    """A config class registers a transform name that another config class already holds."""


ENTRY_POINT_GROUP = "vitcompress.transforms"
_TRANSFORMS: dict[type[TransformConfig], Transform] = {}
_entry_points_loaded = False


def transform_name(config: type[TransformConfig]) -> str:
    """The recipe name of ``config``: the default of its ``transform`` field (``transform: Literal["x"] = "x"``)."""
    if not (isinstance(config, type) and issubclass(config, TransformConfig)):
        raise TypeError(f"a transform's config is a subclass of TransformConfig, got {config!r}")
    name = config.model_fields["transform"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__module__}.{config.__qualname__} gives its `transform` field no name: declare "
                        f'transform: Literal["my_name"] = "my_name"')
    return name


def register(config: type[TransformConfig]) -> Callable[[TransformFn], TransformFn]:
    """Decorator: register ``fn(model, config, inputs) -> converted module names`` as the function of ``config``,
    under the name its ``transform`` field gives. Registering ``config`` again replaces its function; a name
    that another config class holds is a :class:`TransformNameTaken`."""
    name = transform_name(config)
    holder = next((t.config for t in _TRANSFORMS.values() if t.name == name and t.config is not config), None)
    if holder is not None:
        raise TransformNameTaken(f"transform {name!r} ({config.__module__}.{config.__qualname__}), a name already "
                                 f"taken by {holder.__module__}.{holder.__qualname__}")

    def wrap(fn: TransformFn) -> TransformFn:
        doc = " ".join((fn.__doc__ or "").split())
        _TRANSFORMS[config] = Transform(name=name, config=config, apply=fn, doc=doc)
        return fn

    return wrap


@contextmanager
def rollback_on_error() -> Iterator[None]:
    """Undo the registrations made inside the block when it raises: a plugin that fails half-way registers
    nothing."""
    saved = dict(_TRANSFORMS)
    try:
        yield
    except BaseException:
        _TRANSFORMS.clear()
        _TRANSFORMS.update(saved)
        raise


def _load_entry_points() -> None:
    """Load the installed ``vitcompress.transforms`` entry points, once per process (at the first lookup)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        load_entry_points()


def load_entry_points() -> None:
    """Load every installed entry point of the group ``vitcompress.transforms``: its module registers its
    transforms on import; an entry point naming a config class or a function must name a registered one."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        where = (f"entry point {entry_point.name} = {entry_point.value} "
                 f"(group {ENTRY_POINT_GROUP}{_dist(entry_point)})")
        try:
            with rollback_on_error():
                _check_registered(entry_point.load(), where)
        except RecipeError:
            raise
        except TransformNameTaken as exc:
            raise RecipeError(f"{where}: registers {exc}") from None
        except Exception as exc:  # noqa: BLE001 (any failure of the plugin's own code is reported the same way)
            raise RecipeError(f"{where}: cannot load it: {type(exc).__name__}: {exc}") from None


def _dist(entry_point: EntryPoint) -> str:
    """``, from <distribution>`` when the entry point knows its distribution."""
    dist = getattr(entry_point, "dist", None)
    return f", from {dist.name}" if dist is not None else ""


def _check_registered(loaded: Any, where: str) -> None:
    """An entry point names a module, or a config class or function that its module registered on import."""
    if isinstance(loaded, ModuleType):
        return
    if any(loaded is t.config or loaded is t.apply for t in _TRANSFORMS.values()):
        return
    raise RecipeError(f"{where}: names {loaded!r}, which is not registered: decorate the function with "
                      "@register(Config) in the module the entry point names")


def get(name: str) -> Transform | None:
    """The transform registered as ``name`` (the built-ins register when ``vitcompress.transforms`` is imported,
    installed plugins at the first lookup)."""
    _load_entry_points()
    return next((t for t in _TRANSFORMS.values() if t.name == name), None)


def for_config(config: TransformConfig | type[TransformConfig]) -> Transform | None:
    """The transform registered for ``config``'s class (an instance or the class itself)."""
    _load_entry_points()
    return _TRANSFORMS.get(config if isinstance(config, type) else type(config))


def available() -> dict[str, Transform]:
    """Every registered transform by name, sorted."""
    _load_entry_points()
    return {t.name: t for t in sorted(_TRANSFORMS.values(), key=lambda t: t.name)}
