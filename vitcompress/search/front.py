"""The result of a tune study: its Pareto front of replayable recipes, the best one or the nearest miss, and the
files that hold them (``pareto/NN.yaml``, ``pareto.json``, ``pareto.html``).

The front is the set of measured trials that no other trial beats on both speed-up and points lost, among those
within the accuracy budget (an accuracy study; a latency study takes every trial). Its entries are numbered by
speed-up, fastest first. The best is the fastest entry that meets every constraint; without one, the nearest
miss is the trial whose constraint violations, each relative to its limit, sum least.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from vitcompress.search.result import TrialPoint, TuneResult
from vitcompress.search.settings import TuneSettings
from vitcompress.search.trial import Measured

#: study user attribute holding trial N's confirmation replay (:mod:`vitcompress.search.confirm`):
#: ``CONFIRMED_ATTR + str(N)``.
CONFIRMED_ATTR = "vitcompress.confirmed."


def confirmations(study: Any) -> dict[int, Measured]:
    """The confirmation replay of each confirmed trial, by trial number."""
    return {int(key[len(CONFIRMED_ATTR):]): Measured.model_validate(value)
            for key, value in study.user_attrs.items() if key.startswith(CONFIRMED_ATTR)}


def points(study: Any, settings: TuneSettings) -> list[TrialPoint]:
    """Every complete trial of ``study`` with its measurement (its confirmation's, where it has one)."""
    from optuna.trial import TrialState

    confirmed = confirmations(study)
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "result" not in trial.user_attrs:
            continue
        own = Measured.model_validate(trial.user_attrs["result"])
        measured = confirmed.get(trial.number, own)
        found.append(TrialPoint(
            trial=trial.number, summary=trial.user_attrs.get("summary", ""), recipe=trial.user_attrs["recipe"],
            measured=measured, confirmed=trial.number in confirmed,
            trial_measured=own if trial.number in confirmed else None,
            meets_constraints=all(c <= 0 for c in settings.constraints(measured.speedup, measured.latency_ms,
                                                                       measured.drop).values())))
    return found


def front_of(all_points: list[TrialPoint], settings: TuneSettings) -> list[TrialPoint]:
    """The non-dominated points (speed-up up, drop down) within the accuracy budget, fastest first."""
    pool = [p for p in all_points if settings.objective == "latency" or p.measured.drop <= settings.max_drop]

    def dominated(p: TrialPoint) -> bool:
        return any(q.measured.speedup >= p.measured.speedup and q.measured.drop <= p.measured.drop
                   and (q.measured.speedup > p.measured.speedup or q.measured.drop < p.measured.drop) for q in pool)

    front = sorted((p for p in pool if not dominated(p)), key=lambda p: (-p.measured.speedup, p.trial))
    return [p.model_copy(update={"file": f"pareto/{i + 1:02d}.yaml"}) for i, p in enumerate(front)]


def nearest_miss(all_points: list[TrialPoint], settings: TuneSettings) -> Optional[TrialPoint]:
    limits = settings.limits()

    def violation(p: TrialPoint) -> float:
        values = settings.constraints(p.measured.speedup, p.measured.latency_ms, p.measured.drop)
        return sum(max(value, 0.0) / limits[key] for key, value in values.items())

    return min(all_points, key=violation, default=None)


def summarise(study: Any, settings: TuneSettings, storage: str, machine: str, date: str) -> TuneResult:
    """The :class:`TuneResult` of ``study`` now."""
    from optuna.trial import TrialState

    all_points = points(study, settings)
    front = front_of(all_points, settings)
    best = next((p for p in front if p.meets_constraints), None)
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return TuneResult(settings=settings, study=study.study_name, storage=storage,
                      trials=len(all_points) + len(pruned), measured=len(all_points),
                      refused=sum("refused" in t.user_attrs for t in pruned),
                      confirmed=sum(p.confirmed for p in all_points), front=front, points=all_points,
                      best=best,
                      nearest_miss=None if best else nearest_miss(all_points, settings), machine=machine, date=date)


def recipe_file_text(point: TrialPoint, result: TuneResult) -> str:
    """A front entry's recipe with a header saying what it measured, where and when."""
    m = point.measured
    accuracy = (f"top-1 {m.original_top1:.2f} → {m.top1:.2f} % (drop {m.drop:.2f} pt)" if m.top1 is not None
                else f"disagreement {m.drop:.2f} pt")
    how = (f"confirmed by a replay ({point.trial_measured.speedup:.2f}× in the trial)" if point.trial_measured
           else "measured in the trial")
    header = (f"# vitcompress tune, trial {point.trial} of study {result.study!r}: {point.summary}\n"
              f"# {how}, {result.date} on {result.machine}: {m.speedup:.2f}× at batch "
              f"{result.settings.batch_size} ({m.original_ms:.2f} → {m.latency_ms:.2f} ms), {accuracy}, "
              f"agreement {100 * m.agreement:.2f} %\n"
              f"# replay: vitcompress convert {result.settings.model} --recipe {point.file}\n")
    return header + point.recipe


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_outputs(result: TuneResult, out_dir: Path) -> None:
    """Replace ``out_dir``'s pareto/, pareto.json and pareto.html with ``result``'s (each written beside and
    renamed into place, so a reader never sees half of one)."""
    from vitcompress.search.html import pareto_html

    staging = Path(tempfile.mkdtemp(prefix=".pareto-", dir=out_dir))
    staging.chmod(0o777 & ~_umask())
    try:
        for point in result.front:
            (staging / Path(point.file).name).write_text(recipe_file_text(point, result))
        old = out_dir / ".pareto-old"
        shutil.rmtree(old, ignore_errors=True)
        if (out_dir / "pareto").exists():
            os.replace(out_dir / "pareto", old)
        os.replace(staging, out_dir / "pareto")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, text in (("pareto.json", result.model_dump_json(indent=2) + "\n"),
                       ("pareto.html", pareto_html(result))):
        part = out_dir / f".{name}.partial"
        part.write_text(text, encoding="utf-8")
        os.replace(part, out_dir / name)
