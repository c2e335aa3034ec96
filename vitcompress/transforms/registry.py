"""Registry of recipe transforms: each is a pydantic config class plus a function that swaps modules.

A transform module registers itself with :func:`register`; recipe parsing looks up the config class by the
step's ``transform:`` name, and the transform stage calls the function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class TransformConfig(BaseModel):
    """Fields every step has: which modules it converts (``targets``) and which of those it leaves alone."""

    model_config = ConfigDict(extra="forbid")

    keeps_token_count: ClassVar[bool] = True
    """False for a transform that changes the number of tokens (token merging): the final tokens then cannot be
    compared with the original model's, so such a step excludes ``finetune.distill.tokens_mse``."""

    transform: str
    targets: list[str] = Field(min_length=1, description="selectors: exact name, glob, 're:<regex>' or a class name")
    ignore: list[str] = Field(default_factory=list, description="selectors removed from the matches")


ATTENTIONS = ("blocks.*.attn",)
MLP_LINEARS = ("blocks.*.mlp.fc1", "blocks.*.mlp.fc2")


def default_targets(selectors: tuple[str, ...], what: str) -> Any:
    """A ``targets`` field defaulting to ``selectors``, so ``Config()`` converts the natural modules of a ViT."""
    return Field(default_factory=lambda: list(selectors), min_length=1,
                 description=f"selectors: exact name, glob, 're:<regex>' or a class name; default {what}")


@dataclass
class TransformInputs:
    """What a transform may need beyond the model: a source of calibration image batches. ``details`` is
    where a transform leaves JSON-able facts for the report (e.g. the scores behind its choices)."""

    calibration_batches: Callable[[], Iterable[torch.Tensor]]
    details: dict[str, Any] = field(default_factory=dict)


class TransformFn(Protocol):
    def __call__(self, model: nn.Module, config: TransformConfig, inputs: TransformInputs) -> list[str]: ...


@dataclass(frozen=True)
class Transform:
    name: str
    config: type[TransformConfig]
    apply: TransformFn
    doc: str


_TRANSFORMS: dict[str, Transform] = {}


def register(name: str, config: type[TransformConfig]) -> Callable[[TransformFn], TransformFn]:
    """Decorator: register ``fn(model, config, inputs) -> converted module names`` under ``name``."""

    def wrap(fn: TransformFn) -> TransformFn:
        _TRANSFORMS[name] = Transform(name=name, config=config, apply=fn, doc=" ".join((fn.__doc__ or "").split()))
        return fn

    return wrap


def get(name: str) -> Transform | None:
    """The transform registered as ``name`` (the built-ins register when ``vitcompress.transforms`` is imported)."""
    return _TRANSFORMS.get(name)


def available() -> dict[str, Transform]:
    return dict(sorted(_TRANSFORMS.items()))
