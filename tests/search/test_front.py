"""The front of a study: non-dominated within the accuracy budget, fastest first; the best meets every constraint;
without one the nearest miss is the smallest relative violation; constraints as Optuna reads them."""

import pytest

from vitcompress.errors import UsageError
from vitcompress.search.front import front_of, nearest_miss
from vitcompress.search.result import TrialPoint
from vitcompress.search.settings import TuneSettings, check_targets
from vitcompress.search.trial import Measured, drop_of


def point(trial: int, speedup: float, drop: float, settings: TuneSettings) -> TrialPoint:
    measured = Measured(speedup=speedup, latency_ms=10 / speedup, original_ms=10.0, spread=0.05, top1=90 - drop,
                        original_top1=90.0, agreement=0.99, drop=drop, max_abs_diff=1e-5, seconds=1.0)
    values = settings.constraints(speedup, measured.latency_ms, drop).values()
    return TrialPoint(trial=trial, summary=f"t{trial}", recipe="steps: []\n", measured=measured,
                      meets_constraints=all(v <= 0 for v in values))


def settings(**changes) -> TuneSettings:
    return TuneSettings(model="vit_fmnist", space={}, **changes)


def test_front_is_non_dominated_within_the_budget_fastest_first():
    s = settings(max_drop=1.0)
    points = [point(0, 1.5, 0.2, s), point(1, 2.0, 0.5, s), point(2, 1.8, 0.6, s),  # 2 dominated by 1
              point(3, 3.0, 1.5, s),  # over the budget
              point(4, 1.2, 0.0, s), point(5, 2.0, 0.5, s)]  # 5 ties 1: neither dominates
    front = front_of(points, s)
    assert [p.trial for p in front] == [1, 5, 0, 4]
    assert [p.file for p in front] == ["pareto/01.yaml", "pareto/02.yaml", "pareto/03.yaml", "pareto/04.yaml"]


def test_a_latency_study_keeps_every_trial_on_its_front():
    s = settings(objective="latency")
    front = front_of([point(0, 3.0, 40.0, s), point(1, 1.1, 0.0, s)], s)
    assert [p.trial for p in front] == [0, 1]
    assert s.constraints(3.0, 1.0, 40.0) == {"parity": 0.0}


def test_constraints_are_distances_to_each_limit():
    s = settings(max_drop=0.5, target_speedup=2.0)
    assert s.constraints(1.5, 2.0, 0.7) == pytest.approx({"drop": 0.2, "parity": 0.0, "speedup": 0.5})
    latency = settings(max_drop=0.5, target_latency_ms=4.0)
    assert latency.constraints(3.0, 3.5, 0.1, 0.01) == pytest.approx({"drop": -0.4, "parity": 0.01,
                                                                     "latency_ms": -0.5})


def test_the_nearest_miss_has_the_smallest_relative_violation():
    s = settings(max_drop=1.0, target_speedup=3.0)
    points = [point(0, 2.9, 1.4, s),  # 0.4 / 1 + 0.1 / 3
              point(1, 2.4, 0.0, s),  # 0.6 / 3 = 0.2
              point(2, 4.0, 3.0, s)]  # 2.0
    assert nearest_miss(points, s).trial == 1
    assert nearest_miss([], s) is None


def test_an_int8_or_merging_recipe_carries_the_parity_its_trial_measured():
    from vitcompress.recipe import Recipe
    from vitcompress.search.space import is_exact, with_parity_gate

    recipe = Recipe.model_validate({"export": {"quantize": "dynamic"}})
    assert not is_exact(recipe) and is_exact(Recipe())
    assert with_parity_gate(recipe, 0.0213).validate_.max_abs_diff == pytest.approx(0.027)
    assert with_parity_gate(recipe, 1e-6).validate_.max_abs_diff == pytest.approx(1e-3)  # never below the default


def test_unlabelled_data_counts_disagreement_points():
    assert drop_of(None, None, 0.97) == pytest.approx(3.0)
    assert drop_of(88.0, 90.0, 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize("args, message", [
    ((-0.1, None, None, 5, 1), "--max-drop -0.1"),
    ((1.0, 0.9, None, 5, 1), "--target-speedup 0.9"),
    ((1.0, 1.0, None, 5, 1), "--target-speedup 1"),
    ((1.0, None, 0.0, 5, 1), "--target-latency-ms 0"),
    ((1.0, 2.0, 3.0, 5, 1), "exclude each other"),
    ((1.0, None, None, 0, 1), "--trials 0"),
    ((1.0, None, None, 5, 0), "--workers 0"),
])
def test_impossible_targets_are_bad_input(args, message):
    with pytest.raises(UsageError, match=message):
        check_targets(*args)


def test_the_fine_tune_fidelity_goes_to_fast_trials_just_outside_the_budget():
    from vitcompress.search.study import promising

    s = settings(max_drop=1.0, finetune_steps=50)

    def screen(speedup, drop):
        return point(0, speedup, drop, s).measured

    assert promising(screen(2.0, 2.5), s, best_speedup=1.5)
    assert not promising(screen(2.0, 0.5), s, best_speedup=1.5)  # already within the budget
    assert not promising(screen(2.0, 4.5), s, best_speedup=1.5)  # more than three budgets out
    assert not promising(screen(1.4, 2.5), s, best_speedup=1.5)  # slower than a trial that meets it
    assert promising(screen(1.4, 2.5), s, best_speedup=None)
    assert not promising(screen(2.0, 2.5), settings(max_drop=1.0), best_speedup=None)  # no fidelity asked


def _study_of(trials: list[tuple[float, float]], s: TuneSettings):
    """An in-memory Optuna study holding complete trials measured at (speed-up, drop)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, (speedup, drop) in enumerate(trials):
        measured = point(number, speedup, drop, s).measured
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[speedup, drop],
                                     user_attrs={"result": measured.model_dump(), "recipe": "steps: []\n",
                                                 "summary": f"t{number}"}))
    return study


def test_a_confirmation_replaces_the_trials_timing_and_the_front_follows_it():
    from vitcompress.search.front import CONFIRMED_ATTR, points, summarise

    s = settings(max_drop=1.0)
    study = _study_of([(2.1, 0.0), (1.7, 0.0), (1.5, 0.0)], s)
    assert [p.trial for p in front_of(points(study, s), s)] == [0]
    lucky = point(0, 1.6, 0.0, s).measured  # trial 0's replay: it was timed in a lucky burst
    study.set_user_attr(f"{CONFIRMED_ATTR}0", lucky.model_dump())
    found = points(study, s)
    assert found[0].confirmed and found[0].measured.speedup == 1.6 and found[0].trial_measured.speedup == 2.1
    assert not found[1].confirmed and found[1].trial_measured is None
    result = summarise(study, s, "memory", "test machine", "2026-12-07")
    assert [p.trial for p in result.front] == [1] and result.confirmed == 1


def test_the_confirmation_header_of_a_front_recipe_names_both_timings():
    from vitcompress.search.front import CONFIRMED_ATTR, recipe_file_text, summarise

    s = settings(max_drop=1.0)
    study = _study_of([(2.1, 0.0)], s)
    study.set_user_attr(f"{CONFIRMED_ATTR}0", point(0, 1.9, 0.0, s).measured.model_dump())
    result = summarise(study, s, "memory", "test machine", "2026-12-07")
    header = recipe_file_text(result.front[0], result).splitlines()[1]
    assert header.startswith("# confirmed by a replay (2.10× in the trial), 2026-12-07") and "1.90×" in header
