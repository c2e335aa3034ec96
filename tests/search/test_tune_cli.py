"""`vitcompress tune` from the CLI on the tiny reference architecture: the sensitivity map seeds the study, every
trial is a measured conversion, the front is written as replayable recipes with pareto.json and pareto.html; a
rerun resumes; a miss exits 1 naming it; bad input is one error line, exit 2, nothing written."""

import json

import optuna
import pytest
import yaml

from tests.test_cli import invoke, one_error_line
from vitcompress.report import Report
from vitcompress.search.result import TuneResult

TINY = ["--random-init", "--model-arg", "depth=2", "--data", "synthetic"]
FAST = ["--images", "16", "--runs", "3", "--set", "validate.warmup_runs=1", "--set", "calibration.images=16",
        "--set", "calibration.batch_size=16"]


def tune(out, *extra):
    return invoke("tune", "vit_fmnist", *TINY, *FAST, "--out", out, *extra)


def load(out):
    return optuna.load_study(study_name="vitcompress-tune", storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "run"
    result = tune(out, "--max-drop", "100", "--trials", "4")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_a_study_writes_a_front_of_replayable_recipes(tuned):
    out, output = tuned
    result = TuneResult.model_validate_json((out / "pareto.json").read_text())
    assert result.trials == 4 and result.measured + result.refused == 4
    assert result.front and result.best == result.front[0]
    assert all(p.confirmed for p in result.front) and result.confirmed >= len(result.front)  # replayed at the end
    files = sorted(p.name for p in (out / "pareto").iterdir())
    assert files == [f"{i + 1:02d}.yaml" for i in range(len(result.front))]
    first = (out / "pareto" / "01.yaml").read_text()
    assert first.startswith("# vitcompress tune, trial") and "replay: vitcompress convert vit_fmnist" in first
    assert yaml.safe_load(first)["validate"]["max_top1_drop"] == 100
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"best: {out / 'pareto' / '01.yaml'}: {result.best.measured.speedup:.2f}×")


def test_the_sensitivity_map_seeds_the_first_trials(tuned):
    out, _ = tuned
    mapped = json.loads((out / "sensitivity.json").read_text())
    assert [s["transform"] for s in mapped["steps"]] == ["svd_lowrank", "svd_lowrank", "taylor_attention",
                                                          "shift_linear"]
    seeded = [t for t in load(out).trials if "seed" in t.user_attrs]
    assert seeded and seeded[0].number == 0
    assert seeded[-1].user_attrs["seed"] == "int8 dynamic"  # the one-call onnxruntime baseline
    fill = seeded[0].user_attrs["seed"]
    assert [t.user_attrs["seed"] for t in seeded[-3:-1]] == [f"{fill} · int8 dynamic", f"{fill} · int8 static"]


def test_pareto_html_is_self_contained_and_shows_every_trial(tuned):
    out, _ = tuned
    page = (out / "pareto.html").read_text()
    result = TuneResult.model_validate_json((out / "pareto.json").read_text())
    assert "<script src=\"http" not in page and "plotly" in page.lower()
    for point in result.points:
        assert f"trial {point.trial}" in page


def test_a_pareto_recipe_replays_with_convert(tuned, tmp_path):
    out, _ = tuned
    result = TuneResult.model_validate_json((out / "pareto.json").read_text())
    replay = invoke("convert", "vit_fmnist", "--recipe", out / "pareto" / "01.yaml", *TINY, "--out", tmp_path / "r")
    assert replay.exit_code == 0, replay.output
    converted = Report.load(tmp_path / "r").validation.models["converted"]
    assert converted.agreement == pytest.approx(result.best.measured.agreement)


def test_other_settings_on_the_same_study_are_refused(tuned):
    out, _ = tuned
    before = len(load(out).trials)
    result = tune(out, "--max-drop", "50", "--trials", "4")
    assert result.exit_code == 2 and one_error_line(result.output)
    assert "other settings (max_drop differ)" in result.output
    assert len(load(out).trials) == before


def test_no_trial_meeting_the_target_exits_1_naming_the_nearest_miss(tmp_path):
    out = tmp_path / "miss"
    result = tune(out, "--target-speedup", "1000", "--trials", "1", "--no-sensitivity")
    assert result.exit_code == 1, result.output
    assert "no recipe met top-1 drop ≤ 1 pt, speed-up ≥ 1000× in 1 trials; nearest miss: trial 0" in result.output
    assert (out / "pareto.json").is_file()


def bad(tmp_path, *args):
    out = tmp_path / "out"
    result = invoke("tune", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert one_error_line(result.output), result.output
    assert not out.exists()
    return result.output


@pytest.mark.parametrize("args, message", [
    (["--target-speedup", "0.5"], "--target-speedup 0.5"),
    (["--max-drop", "-1"], "--max-drop -1"),
    (["--target-speedup", "2", "--target-latency-ms", "3"], "exclude each other"),
    (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
    (["--sensitivity", "s.json", "--no-sensitivity"], "exclude each other"),
    (["--set", "steps=[]"], "--set steps=[]: tune chooses the steps"),
    (["--set", "validate.threads=0"], "validate.threads"),
    (["--confirm", "-1"], "--confirm -1"),
])
def test_bad_arguments(tmp_path, args, message):
    assert message in bad(tmp_path, "vit_fmnist", *TINY, *args)


def test_an_empty_space(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("rank_ratios: []\ntaylor: false\nshift_mlp: false\ntoken_merge: null\nattention_skip: null\n"
                     "quantize: [none]\n")
    assert "the search space is empty" in bad(tmp_path, "vit_fmnist", *TINY, "--space", space)


def test_a_bad_space_file(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("groups: 0\n")
    assert "space.yaml: groups: Input should be greater than or equal to 1" in bad(tmp_path, "vit_fmnist", *TINY,
                                                                                  "--space", space)


def test_too_few_images_for_the_held_out_split(tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    for cls in ("0", "1"):
        (data / cls).mkdir(parents=True)
    Image.new("L", (28, 28)).save(data / "0" / "a.png")
    Image.new("L", (28, 28)).save(data / "1" / "b.png")
    assert "too few for a held-out split" in bad(tmp_path, "vit_fmnist", "--random-init", "--model-arg", "depth=2",
                                                  "--data", data)


def test_an_out_that_is_not_a_tune_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("tune", "vit_fmnist", *TINY, "--out", out)
    assert result.exit_code == 2 and one_error_line(result.output)
    assert "holds files that are not a tune study's (notes.txt)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dashboard_prints_how_to_open_the_study(tmp_path):
    result = invoke("tune", "--dashboard", "--out", tmp_path / "t")
    assert result.exit_code == 0
    assert f"optuna-dashboard sqlite:///{(tmp_path / 't' / 'study.db').resolve()}" in result.output
