"""``vitcompress.tune()``: search the recipe space for the fastest conversions of one model within an accuracy
budget, measured on this machine; the study is resumable and can be shared by workers and machines.

Order of work: every check of bad input first (targets, space file, model, data and its held-out split,
storage URL, an output directory that is not a tune directory), so bad input writes nothing; then the study is
opened (created, or resumed when its settings match), the sensitivity map seeds a fresh study's first trials,
``workers`` processes run trials until the study holds ``trials`` finished ones, and the front is written.
"""

from __future__ import annotations

import datetime
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from vitcompress.context import ConvertSettings, RunContext
from vitcompress.errors import OutputError, UsageError
from vitcompress.measure import machine_description
from vitcompress.models import check_model_args, chosen_name, load_model
from vitcompress.pipeline import calibration_batches, load_data
from vitcompress.progress import LogProgress, Progress
from vitcompress.recipe import Recipe, apply_overrides, parse_recipe
from vitcompress.search import seeds as seeding
from vitcompress.search import study as studies
from vitcompress.search.confirm import confirm_front
from vitcompress.search.front import summarise, write_outputs
from vitcompress.search.result import TuneResult
from vitcompress.search.settings import Objective, Sampler, TuneSettings, check_targets
from vitcompress.search.space import ResolvedSpace, SearchSpace, choice_params, load_space, resolve_space

DEFAULT_STUDY = "vitcompress-tune"
TUNE_FILES = {"study.db", "study.db-journal", "sensitivity.json", "pareto", "pareto.json", "pareto.html",
              ".pareto-old"}


@dataclass(frozen=True)
class TrialLine:
    """One finished trial, as the progress display shows it."""

    number: int
    state: str
    summary: str
    speedup: Optional[float]
    drop: Optional[float]
    meets: bool
    note: str
    done: int
    total: int
    best_speedup: Optional[float]
    elapsed_s: float
    left_s: Optional[float]


def _base_recipe(name: str, settings_images: int, batch_size: int, runs: int, max_drop: Optional[float],
                 overrides: list[str]) -> Recipe:
    """The settings every trial's recipe shares (the steps and export quantization are the trial's)."""
    data: dict[str, Any] = {
        "model": name,
        # no per-block profile and no accuracy ladder: a trial reads the validation numbers only
        "validate": {"images": settings_images, "batch_sizes": [batch_size], "latency_runs": runs,
                     "profile_runs": 0, "ladder_images": 0,
                     **({"max_top1_drop": max_drop} if max_drop is not None else {})},
    }
    for item in overrides:
        key = item.partition("=")[0].strip().split(".")[0]
        if key in ("steps", "cascade", "model", "plugins"):
            raise UsageError(f"--set {item}: tune chooses the steps and the model; set calibration, finetune, "
                             "export or validate values")
    if overrides:
        data = apply_overrides(data, overrides, "--set")
    return parse_recipe(data, "--set")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file: tune writes a directory (study.db, pareto/, pareto.json, "
                          "pareto.html)")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in TUNE_FILES
                         and not p.name.startswith(".pareto"))
        if foreign:
            raise OutputError(f"--out {out_dir} holds files that are not a tune study's ({', '.join(foreign[:5])}): "
                              "give an empty or new directory, or the --out of an earlier tune to resume it")


def tune(
    model: str | None,
    *,
    data: str | None = None,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    model_args: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    space: Union[str, Path, SearchSpace, None] = None,
    objective: Objective = "accuracy",
    max_drop: float = 1.0,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    trials: int = 60,
    batch_size: int = 1,
    images: int = 1000,
    runs: int = 30,
    finetune_steps: int = 0,
    workers: int = 1,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    sampler: Sampler = "tpe",
    seed: int = 0,
    sensitivity: Union[str, Path, bool] = True,
    confirm: int = 5,
    out_dir: str | Path = "tune",
    progress: Progress | None = None,
    on_trial: Callable[[TrialLine], None] | None = None,
) -> TuneResult:
    """Search for the fastest recipes for ``model`` that keep its accuracy, and write them as a Pareto front.

    Each trial is a real conversion (:func:`vitcompress.convert`) of a recipe drawn from the search space,
    measured on the held-out images and timed against the original in onnxruntime. See docs/tune.md.

    Args:
        model: a model name (timm name, alias or reference model).
        data, checkpoint, random_init, model_args, overrides: as :func:`vitcompress.convert` (``overrides`` are
            ``--set`` values for what every trial shares: calibration, finetune, export, validate).
        space: a ``--space`` YAML file or a :class:`SearchSpace`; default: every transform, fitted to the model.
        objective: ``accuracy`` (points lost must stay within ``max_drop``) or ``latency`` (speed only, within
            the space's structural floor; agreement is still measured and shown).
        max_drop: top-1 points the conversion may lose (disagreement points on unlabelled data).
        target_speedup, target_latency_ms: the speed target (one of them, optional), a constraint.
        trials: finished trials the study holds when it stops (a resumed study runs the rest).
        batch_size, images, runs: the timed batch size, held-out images per trial, timed runs per model.
        finetune_steps: the distillation fine-tune fidelity given to promising trials (0: training-free).
        workers: processes on this machine running trials of the same study.
        storage: an Optuna RDB URL (default ``sqlite:///<out_dir>/study.db``); PostgreSQL to share machines.
        study_name: the study's name in the storage.
        sampler: ``tpe`` (default) or ``nsga2``; seeded with ``seed``.
        sensitivity: True: map the space's steps first (``sensitivity.json``) and seed the first trials from
            it; a path: reuse that map; False: no seeding.
        confirm: at most this many replays at the end that re-measure the front's entries
            (:mod:`vitcompress.search.confirm`); 0: the front rests on the trials' own timings.
        out_dir: where ``study.db`` (with the default storage), ``pareto/NN.yaml``, ``pareto.json`` and
            ``pareto.html`` go.
        progress: receives stage lines; ``on_trial``: called after each finished trial of this process.

    Returns:
        The :class:`~vitcompress.search.front.TuneResult` (front, best or nearest miss).

    Raises:
        UsageError, ModelError, DataError, RecipeError, OutputError: bad input, before anything is written.
    """
    progress = progress or LogProgress()
    check_targets(max_drop, target_speedup, target_latency_ms, trials, workers)
    if confirm < 0:
        raise UsageError(f"--confirm {confirm}: a number of replays, 0 or more")
    space_config = space if isinstance(space, SearchSpace) else load_space(Path(space)) if space else SearchSpace()
    name = chosen_name(model, None)
    check_model_args(model_args, Path(checkpoint) if checkpoint else None, random_init)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    base = _base_recipe(name, images, batch_size, runs, max_drop if objective == "accuracy" else None,
                        list(overrides or []))
    url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    opened = studies.open_storage(url) if storage is not None else None  # a URL it cannot open fails first
    progress.stage("load", name)
    loaded = load_model(name, Path(checkpoint) if checkpoint else None, random_init, model_args)
    ctx = RunContext(settings=ConvertSettings(model=name, out_dir=out_dir, data=data, random_init=random_init,
                                              model_args=dict(model_args or {})),
                     recipe=base, work_dir=out_dir, scratch_dir=out_dir, progress=progress, original=loaded)
    held_out = ctx.data = load_data(ctx)  # a data directory too small for its held-out split fails here
    progress.stage("data", f"{held_out.name}: {len(held_out.train)} calibration/fine-tune images, "
                           f"{len(held_out.val)} held-out images choose the recipe")
    resolved = resolve_space(space_config, loaded.model, tuple(loaded.data_config["input_size"]),
                             lambda: calibration_batches(ctx))
    for transform, reason in resolved.refused.items():
        progress.stage("space", f"{transform} left out: {reason}")
    if resolved.dimensions == 0:
        raise UsageError("the search space is empty: every transform is switched off in --space or refused by the "
                         "model, and export quantization has one choice")
    if resolved.skip_order:
        progress.stage("space", "attention blocks by CKA (skipped first): "
                                + ", ".join(map(str, resolved.skip_order)))
    settings = TuneSettings(
        model=name, checkpoint=str(checkpoint) if checkpoint else None, random_init=random_init,
        model_args=dict(model_args or {}), data=data, objective=objective, max_drop=max_drop,
        target_speedup=target_speedup, target_latency_ms=target_latency_ms, batch_size=batch_size, images=images,
        runs=runs, finetune_steps=finetune_steps, overrides=list(overrides or []),
        space=space_config.model_dump(mode="json"), sampler=sampler, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    opened = studies.open_storage(url) if storage is None else opened
    study = studies.open_study(settings, opened, study_name)
    progress.stage("study", f"{study_name!r} in {studies._redacted(url)}: {studies.finished(study)} of {trials} "
                            f"trials done; {resolved.dimensions} dimensions; {settings.target_text()}")
    if not study.trials and sensitivity is not False:
        _seed(study, settings, resolved, base, out_dir, sensitivity, progress, data, checkpoint, random_init,
              model_args)
    recovered = studies.recover_dead_trials(study)
    if recovered:
        progress.stage("resume", f"{recovered} trial(s) of a stopped worker failed and queued again")
    source = {"data": data, "checkpoint": checkpoint, "random_init": random_init, "model_args": model_args}
    _run_workers(study, settings, resolved, base, trials, source, workers, url,
                 study_name, on_trial)
    confirm_front(study, settings, source, confirm, progress)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result = summarise(study, settings, studies._redacted(url), machine_description(), date)
    result = result.model_copy(update={"out_dir": str(out_dir)})
    write_outputs(result, out_dir)
    return result


def _seed(study: Any, settings: TuneSettings, space: ResolvedSpace, base: Recipe, out_dir: Path,
          sensitivity: Union[str, Path, bool], progress: Progress, data: Any, checkpoint: Any, random_init: bool,
          model_args: Any) -> None:
    """Map the probe steps (or read ``sensitivity``) and enqueue the seed trials."""
    from vitcompress.files import replace_text
    from vitcompress.sensitivity_map import Sensitivity
    from vitcompress.sensitivity_map import sensitivity as map_sensitivity

    probe, probes = seeding.probe_recipe(space, base)
    if not probes:
        mapped = None
    elif sensitivity is True:
        progress.stage("map", f"sensitivity of {', '.join(probes)} on {len(space.groups)} block groups")
        mapped = map_sensitivity(settings.model, probe, checkpoint=checkpoint, data=data, random_init=random_init,
                                 model_args=model_args, groups=len(space.groups), images=settings.images,
                                 batch_size=settings.batch_size, runs=max(settings.runs // 3, 5), progress=progress)
        replace_text(out_dir / "sensitivity.json", mapped.model_dump_json(indent=2) + "\n")
    else:
        path = Path(sensitivity)
        try:
            mapped = Sensitivity.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--sensitivity {path}: not a sensitivity.json ({str(exc).splitlines()[0]})") from None
        if [s.transform for s in mapped.steps] != [s.transform for s in probe.steps] or \
                mapped.groups != space.groups:
            raise UsageError(f"--sensitivity {path}: maps other steps or block groups than this search's probe "
                             "(run tune without --sensitivity to map them)")
    choices = seeding.seed_choices(mapped, probes, space, settings.max_drop if settings.objective == "accuracy"
                                   else None) if mapped else []
    for choice in choices:
        study.enqueue_trial(choice_params(choice, space), user_attrs={"seed": choice.summary()}, skip_if_exists=True)
    progress.stage("seed", f"{len(choices)} first trials from the sensitivity map: "
                           + "; ".join(c.summary() for c in choices))


def _worker(settings: TuneSettings, space: ResolvedSpace, base: Recipe, trials: int, source: dict[str, Any],
            url: str, study_name: str) -> None:
    """A worker process: open the same study and run trials until it holds ``trials`` finished ones."""
    study = studies.open_study(settings, studies.open_storage(url), study_name)
    studies.run_worker(study, settings, space, base, trials, source)


def _run_workers(study: Any, settings: TuneSettings, space: ResolvedSpace, base: Recipe, trials: int,
                 source: dict[str, Any], workers: int, url: str, study_name: str,
                 on_trial: Callable[[TrialLine], None] | None) -> None:
    """This process and ``workers - 1`` spawned ones run trials; this one reports every finished trial."""
    started = time.monotonic()
    done_at_start = studies.finished(study)
    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=_worker, args=(settings, space, base, trials, source, url, study_name),
                              daemon=True) for _ in range(workers - 1)]
    for process in others:
        process.start()

    def report(trial: Any) -> None:
        if on_trial is None:
            return
        done = studies.finished(study)
        per_trial = (time.monotonic() - started) / max(done - done_at_start, 1)
        result = trial.user_attrs.get("result")
        on_trial(TrialLine(
            number=trial.number, state=trial.state.name.lower(), summary=trial.user_attrs.get("summary", ""),
            speedup=result["speedup"] if result else None, drop=result["drop"] if result else None,
            meets=studies.meets(trial),
            note=trial.user_attrs.get("refused", ""), done=done, total=trials,
            best_speedup=studies.best_feasible_speedup(study, settings),
            elapsed_s=time.monotonic() - started, left_s=per_trial * max(trials - done, 0) / workers))

    try:
        studies.run_worker(study, settings, space, base, trials, source, report)
        for process in others:
            process.join()
    finally:
        for process in others:
            if process.is_alive():
                process.terminate()
                process.join(5)
    failed = [p.exitcode for p in others if p.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers - 1} worker processes failed (exit codes {failed}); the study "
                         "keeps their finished trials: rerun the same command to resume")
