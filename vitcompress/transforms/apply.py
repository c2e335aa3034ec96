"""Apply recipe steps to a model: the one loop that ``vitcompress.apply()``, the transform and fine-tune stages,
the cascade and the planner run, each step dispatched by its config's type (:func:`registry.for_config`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

from vitcompress.errors import RecipeError, TargetError
from vitcompress.measure import count_params
from vitcompress.progress import Progress
from vitcompress.report import Step
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformConfig, TransformInputs
from vitcompress.transforms.select import concrete

#: Calibration images for the step described by its argument (e.g. "step 2 (svd_lowrank)"): a function returning
#: fresh batches, called only by a step that calibrates.
CalibrationFor = Callable[[str], Callable[[], Iterable]]


def apply_steps(model: nn.Module, steps: Sequence[TransformConfig], calibration: CalibrationFor, *,
                indices: Sequence[int] | None = None, progress: Progress | None = None) -> list[Step]:
    """Apply ``steps`` (those at ``indices``, default all, in that order) to ``model`` in place; per step what it
    converted, its parameter counts before and after, and its ``details`` (e.g. CKA rounds).

    Raises:
        RecipeError: a step whose config type no transform is registered for.
    """
    order = range(len(steps)) if indices is None else indices
    concrete_steps(model, [steps[i] for i in order], [f"step {i} ({steps[i].transform})" for i in order])
    results = []
    for i in order:
        step = steps[i]
        transform = registry.for_config(step)
        if transform is None:
            known = ", ".join(registry.available())
            raise RecipeError(f"step {i}: {type(step).__qualname__} ({step.transform!r}) is not a registered "
                              f"transform config (known: {known})")
        where = f"step {i} ({step.transform})"
        clock = CalibrationClock(calibration(where))
        inputs = TransformInputs(calibration_batches=clock)
        begin = time.perf_counter()
        before = count_params(model)
        if progress is not None:
            progress.stage("transform", f"step {i}: {step.transform}")
        converted = transform.apply(model, step, inputs)
        results.append(Step(step=i, transform=step.transform, modules=converted, params_before=before,
                            params_after=count_params(model), details=inputs.details or None,
                            seconds=time.perf_counter() - begin, calibration_seconds=clock.seconds))
    return results


class CalibrationClock:
    """A step's source of calibration batches that adds up the wall seconds of its passes: each from the first
    batch asked for until the pass stops asking (the forwards and statistics between batches included)."""

    def __init__(self, batches: Callable[[], Iterable]) -> None:
        self._batches = batches
        self.seconds = 0.0

    def __call__(self) -> Iterator:
        return self._timed()

    def _timed(self) -> Iterator:
        begin = time.perf_counter()
        try:
            yield from self._batches()
        finally:
            self.seconds += time.perf_counter() - begin


def concrete_steps(model: nn.Module, steps: Sequence[TransformConfig], where: Sequence[str] | None = None
                   ) -> list[TransformConfig]:
    """``steps`` with every role and relative-depth selector (``role:mlp.fc1``, ``blocks[-1].attn``) of their
    ``targets`` and ``ignore`` replaced by the exact module names it matches on ``model``: what a recipe means on
    this model, checked before any step runs.

    Raises:
        TargetError: a selector, named with its step, that matches no module or lies outside the model's depth.
    """
    out = []
    for i, step in enumerate(steps):
        label = where[i] if where is not None else f"step {i} ({step.transform})"
        try:
            fields = {key: concrete(model, getattr(step, key), key.rstrip("s") if key == "targets" else key)
                      for key in ("targets", "ignore")}
        except TargetError as exc:
            raise TargetError(f"{label}: {exc}") from None
        out.append(step.model_copy(update=fields))
    return out
