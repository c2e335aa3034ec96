"""The confirmation pass: the front re-measured by replaying each entry's recipe, so the front a user gets rests
on timings a replay reproduces rather than on one trial's timing.

A trial is timed once, interleaved with the original; a burst of load on the machine during that run moves its
speed-up by tens of percent (measured: a trial at 1.99× on a shared machine replayed at 1.67×), and a search
that keeps the fastest of many noisy measurements favours the lucky ones. So when the trials are done, each
entry of the front is converted again from its ``pareto/NN.yaml`` recipe, exactly as a user replays it, with
:data:`RUNS_FACTOR` times the timed runs; that measurement replaces the trial's in the front (the trial's own is
kept beside it), and the front is computed again. Entries that join the front because another one fell are
confirmed in turn, until the front is all confirmed or ``limit`` replays are spent.

Confirmations are stored in the study (a user attribute per trial), so a resumed or shared study keeps them.
"""

from __future__ import annotations

from typing import Any

import yaml

from vitcompress.original_cache import OriginalCache
from vitcompress.progress import Progress
from vitcompress.recipe import parse_recipe
from vitcompress.search.front import CONFIRMED_ATTR, front_of, points
from vitcompress.search.settings import TuneSettings
from vitcompress.search.trial import measure

#: A confirmation times this many times the study's ``--runs`` per model.
RUNS_FACTOR = 3


def confirm_front(study: Any, settings: TuneSettings, source: dict[str, Any], limit: int,
                  progress: Progress) -> int:
    """Replay the unconfirmed entries of the study's front until it is all confirmed or ``limit`` replays are
    spent; returns how many this call ran. ``source`` is :func:`~vitcompress.search.trial.measure`'s."""
    cache = OriginalCache()
    ran = 0
    while ran < limit:
        todo = [p for p in front_of(points(study, settings), settings) if not p.confirmed]
        if not todo:
            break
        point = todo[0]
        recipe = parse_recipe(yaml.safe_load(point.recipe), f"trial {point.trial}'s recipe")
        validate = recipe.validate_.model_copy(update={"latency_runs": RUNS_FACTOR * settings.runs,
                                                       "profile_runs": 0, "ladder_images": 0})
        progress.stage("confirm", f"trial {point.trial} ({point.summary}): measured {point.measured.speedup:.2f}×, "
                                  f"replaying it with {validate.latency_runs} timed runs")
        replay = measure(settings.model, recipe.model_copy(update={"validate_": validate}), settings.batch_size,
                         cache, **source)
        study.set_user_attr(f"{CONFIRMED_ATTR}{point.trial}", replay.model_dump())
        progress.stage("confirm", f"trial {point.trial}: {point.measured.speedup:.2f}× in the trial, "
                                  f"{replay.speedup:.2f}× replayed (spread {replay.spread:.2f}), "
                                  f"drop {point.measured.drop:.2f} → {replay.drop:.2f} pt")
        ran += 1
    return ran
