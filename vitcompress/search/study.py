"""The Optuna study of ``vitcompress tune``: storage, identity on resume, the sampler, and one worker's trial loop.

Storage is Optuna's RDB storage (SQLite by default, ``tune/study.db``; PostgreSQL or MySQL URLs for a study that
several machines share). Each trial records its worker (``host:pid``) and beats a heartbeat, so a trial whose
process died (SIGKILL, a lost machine) is failed and its parameters enqueued again: at once by a worker on the
same host that finds the process gone, else by any worker once the heartbeat is older than
:data:`GRACE_SECONDS`. The study stops at ``trials`` trials that finished (complete or pruned), counted across
all workers.

Sampler: TPE (multivariate, grouped for the conditional space) with the constraints, by default; NSGA-II as
the alternative (docs/tune.md gives the measured comparison). Optuna's pruners take no intermediate values in a
multi-objective study, so the fine-tune fidelity is raised by a rule instead (:func:`promising`).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

from vitcompress.errors import UsageError, VitCompressError
from vitcompress.original_cache import OriginalCache
from vitcompress.recipe import FinetuneConfig, Recipe, ValidateConfig, dump_recipe
from vitcompress.search.settings import TuneSettings
from vitcompress.search.space import ResolvedSpace, is_exact, recipe_for, suggest, with_parity_gate
from vitcompress.search.trial import Measured, measure

SETTINGS_ATTR = "vitcompress.settings"
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
SCHEMA_ATTEMPTS = 3
STARTUP_TRIALS = 10
#: A refused or failed combination is told to the sampler as this far outside every constraint.
REFUSED = 1e6


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_storage(url: str) -> Any:
    """Optuna RDB storage at ``url`` with the heartbeat; a URL it cannot open is a :class:`UsageError`."""
    import optuna
    import sqlalchemy.exc

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                    sqlalchemy.exc.ProgrammingError) as exc:
                # two processes creating a new database's schema at once (PostgreSQL: a duplicate key, or
                # DuplicateTable "relation … already exists"; SQLite: "table … already exists"): the other one's
                # tables are there on the next attempt
                racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)
                if not racing or attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(1 + attempt)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError, OSError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--storage {_redacted(url)}: cannot open it ({detail})") from None
    raise UsageError(f"--storage {_redacted(url)}: cannot open it")


def _redacted(url: str) -> str:
    """``url`` without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (an unparsable URL is shown as given: it holds no parsed password)
        return url


def sampler(settings: TuneSettings) -> Any:
    """The study's sampler, seeded; both read the constraints each trial sets (``Trial.set_constraint``)."""
    import optuna

    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=True,
                                      n_startup_trials=STARTUP_TRIALS)


def open_study(settings: TuneSettings, storage: Any, name: str) -> Any:
    """Create the study, or load it when it exists with the same settings (a :class:`UsageError` when they
    differ: a study measures one thing)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, sampler=sampler(settings),
                                directions=["maximize", "minimize"])
    stored = study.user_attrs.get(SETTINGS_ATTR)
    mine = settings.model_dump(mode="json")
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, mine)
    elif stored != mine:
        changed = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise UsageError(f"study {name!r} in this storage was started with other settings ({', '.join(changed)} "
                         "differ): rerun with the same ones to resume, or give another --out / --study-name")
    return study


def finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover_dead_trials(study: Any) -> int:
    """Fail the running trials whose worker on this host no longer exists, enqueueing their parameters again;
    returns how many. (Trials of other hosts are failed by the heartbeat's grace period.)"""
    from optuna.trial import TrialState

    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        recovered += 1
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def promising(screen: Measured, settings: TuneSettings, best_speedup: float | None) -> bool:
    """Whether a training-free trial earns the fine-tune fidelity: it misses the accuracy budget by at most
    three budgets (a short distillation can win that back) and is faster than every trial that meets it."""
    return (settings.finetune_steps > 0 and settings.max_drop < screen.drop <= 4 * max(settings.max_drop, 0.25)
            and screen.speedup > (best_speedup or 1.0))


def best_feasible_speedup(study: Any, settings: TuneSettings) -> float | None:
    from optuna.trial import TrialState

    speeds = [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if meets(t)]
    return max(speeds, default=None)


def meets(trial: Any) -> bool:
    """Whether a finished trial was measured and met every constraint."""
    return "result" in trial.user_attrs and all(v <= 0 for v in trial.constraints.values())


def for_replay(recipe: Recipe) -> Recipe:
    """The recipe a user replays: as measured, with the report's per-block profile and accuracy ladder back at
    their defaults (a trial skips both; neither changes the model or its measured numbers)."""
    defaults = ValidateConfig()
    validate = recipe.validate_.model_copy(update={"profile_runs": defaults.profile_runs,
                                                   "ladder_images": defaults.ladder_images})
    return recipe.model_copy(update={"validate_": validate})


def run_worker(study: Any, settings: TuneSettings, space: ResolvedSpace, base: Recipe, trials: int,
               source: dict[str, Any], on_trial: Callable[[Any], None] | None = None) -> None:
    """Run trials until the study holds ``trials`` finished ones (this worker's share of them, with others)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cache = OriginalCache()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker_id())
        choice = suggest(trial, space)
        recipe = recipe_for(choice, space, base)
        trial.set_user_attr("summary", choice.summary())
        trial.set_user_attr("recipe", dump_recipe(recipe))
        try:
            result = measure(settings.model, recipe, settings.batch_size, cache, **source)
            if promising(result, settings, best_feasible_speedup(study, settings)):
                trial.set_user_attr("screen", result.model_dump())
                finetune = (recipe.finetune or FinetuneConfig()).model_copy(update={"steps": settings.finetune_steps})
                recipe = recipe.model_copy(update={"finetune": finetune})
                result = measure(settings.model, recipe, settings.batch_size, cache, **source)
        except VitCompressError as exc:  # a combination the transforms or the exporter refuse
            trial.set_user_attr("refused", str(exc))
            for key in settings.constraints(1.0, 1.0, 0.0):
                trial.set_constraint(key, REFUSED)
            raise optuna.TrialPruned(str(exc)) from None
        parity = 0.0
        if is_exact(recipe):
            parity = max(result.max_abs_diff - recipe.validate_.max_abs_diff, 0.0)
        else:
            recipe = with_parity_gate(recipe, result.max_abs_diff)
        trial.set_user_attr("recipe", dump_recipe(for_replay(recipe)))
        trial.set_user_attr("result", result.model_dump())
        for key, value in settings.constraints(result.speedup, result.latency_ms, result.drop, parity).items():
            trial.set_constraint(key, value)
        return result.speedup, result.drop

    def report(study: Any, trial: Any) -> None:
        if on_trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            on_trial(trial)

    if finished(study) >= trials:
        return
    study.optimize(objective, callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                                         report], gc_after_trial=True)
