from pathlib import Path

import pytest
import yaml

from vitcompress.errors import RecipeError
from vitcompress.recipe import (
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_description,
    resolve_recipe,
    shipped_recipes,
)

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
STEP = "  - {transform: svd_lowrank, targets: ['blocks.*.mlp.fc1'], rank: 8}\n"


def test_shipped_recipes_exist():
    assert RECIPES, "recipes/ holds no recipe"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_recipe(recipe))
    again = load_recipe(dumped)
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


def test_defaults_are_filled_in(tiny_recipe):
    resolved = yaml.safe_load(dump_recipe(load_recipe(tiny_recipe("steps:\n" + STEP))))
    assert resolved["steps"][0]["whitening"] == "none" and resolved["steps"][0]["ignore"] == []
    assert resolved["validate"]["batch_sizes"] == [1, 8] and resolved["export"]["opset"] == 20
    assert resolved["finetune"] is None


@pytest.mark.parametrize("text, message", [
    ("steps:\n" + STEP + "finetune: {stepz: 3}\n", r"finetune\.stepz: unknown key \(allowed: steps, lr"),
    ("stepz: []\n", r"stepz: unknown key \(allowed: model, steps"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: 8, colour: red}\n", r"steps\.0\.colour: unknown key"),
    ("steps:\n  - {transform: pruning, targets: [x]}\n", r"steps\.0\.transform: unknown transform 'pruning' \(known: .*svd_lowrank"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: eight}\n", r"steps\.0\.rank: .*integer.*'eight'"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: 0}\n", r"steps\.0\.rank: .*greater than or equal to 1"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], energy: 1.5}\n", r"steps\.0\.energy: .*less than or equal to 1"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank_ratio: 1.0}\n", r"steps\.0\.rank_ratio: .*less than 1"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: 4, energy: 0.9}\n", r"exactly one of rank, rank_ratio, energy \(got rank, energy\)"),
    ("steps:\n  - {transform: svd_lowrank, targets: [], rank: 4}\n", r"steps\.0\.targets: .*at least 1"),
    ("steps:\n  - {transform: svd_lowrank, targets: [x], rank: 4, whitening: zca}\n", r"steps\.0\.whitening: .*'none', 'pca' or 'cholesky'"),
    ("steps:\n  - {targets: [x]}\n", r"steps\.0: each step is a mapping with a 'transform' key"),
    ("steps: {transform: svd_lowrank}\n", "steps: must be a list"),
    ("validate: {batch_sizes: [1, 0]}\n", "batch_sizes must all be"),
    ("export: {opset: 11}\n", r"export\.opset: .*greater than or equal to 17"),
    ("steps:\n" + STEP + "finetune: {stages: [[taylor_attention]]}\n",
     r"finetune\.stages\.0: 'taylor_attention' is not a transform of the steps \(steps use: svd_lowrank\)"),
    ("steps:\n" + STEP + "finetune: {stages: [[svd_lowrank], [svd_lowrank]]}\n",
     r"finetune\.stages\.1: 'svd_lowrank' is already in an earlier stage"),
    ("steps:\n" + STEP + "finetune: {stages: [[]]}\n", r"finetune\.stages\.0: a stage names at least one"),
    ("steps:\n" + STEP + "finetune: {stages: svd_lowrank}\n", r"finetune\.stages: .*valid list"),
    ("- just a list\n", "a recipe is a mapping"),
    ("steps: [\n", r"invalid YAML at line \d+, column \d+"),
])
def test_bad_recipe_names_file_and_key(tiny_recipe, text, message):
    path = tiny_recipe(text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)), "the error must name the file"
    assert "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides(tiny_recipe):
    path = tiny_recipe("steps:\n" + STEP + "finetune: {steps: 10}\n")
    recipe = load_recipe(path, ["finetune.steps=3", "steps.0.rank=4", "validate.batch_sizes=[2, 4]", "export.opset=19"])
    assert recipe.finetune.steps == 3 and recipe.steps[0].rank == 4
    assert recipe.validate_.batch_sizes == [2, 4] and recipe.export.opset == 19
    assert load_recipe(path, ["calibration.images=16"]).calibration.images == 16


@pytest.mark.parametrize("override, message", [
    ("finetune.steps", "expected key.path=value"),
    ("=3", "expected key.path=value"),
    ("finetune..steps=3", "expected key.path=value"),
    ("steps.5.rank=3", r"no list item 5 \(list has 1\)"),
    ("steps.x.rank=3", "no list item x"),
    ("finetune.steps.deep=3", "is not a mapping or list"),
    ("finetune.steps=[1", "not valid YAML"),
    ("finetune.steps=-1", r"finetune\.steps: .*greater than or equal to 0"),
])
def test_bad_override(tiny_recipe, override, message):
    path = tiny_recipe("steps:\n" + STEP + "finetune: {steps: 10}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


def test_parse_accepts_mapping_without_file():
    recipe = parse_recipe({"steps": [{"transform": "svd_lowrank", "targets": ["x"], "rank": 2}]}, "<dict>")
    assert recipe.steps[0].rank == 2


def test_shipped_recipes_are_the_repo_folder():
    assert list(shipped_recipes()) == [p.stem for p in RECIPES]


@pytest.mark.parametrize("name", [p.stem for p in RECIPES])
def test_every_shipped_recipe_has_a_one_line_description(name):
    description = recipe_description(shipped_recipes()[name])
    assert 20 <= len(description) <= 110 and description[0].isupper(), description


def test_name_resolution_cwd_file_first_then_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_recipes()["svd"]
    assert resolve_recipe("svd") == shipped and resolve_recipe("svd.yaml") == shipped
    assert load_recipe("svd", ["finetune.steps=7"]).finetune.steps == 7
    (tmp_path / "svd.yaml").write_text("steps:\n" + STEP)
    assert resolve_recipe("svd.yaml") == Path("svd.yaml")
    assert load_recipe("svd.yaml").finetune is None, "the working directory's svd.yaml must win"
    assert load_recipe("svd").finetune is not None, "a bare name without the file here is the shipped one"


@pytest.mark.parametrize("spec", ["nope", "nope.yaml", "sub/svd.yaml"])
def test_unknown_recipe_lists_the_shipped_names(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=rf"recipe {spec} does not exist: .*\(shipped: cascade, fast, .*svd"):
        load_recipe(spec)


def test_zero_finetune_steps_is_no_finetune(tiny_recipe):
    path = tiny_recipe("steps:\n" + STEP + "finetune: {steps: 10, lr: 1.0e-4}\n")
    zero = load_recipe(path, ["finetune.steps=0"])
    assert zero.finetune is None and zero == load_recipe(path, ["finetune=null"])
    assert yaml.safe_load(dump_recipe(zero))["finetune"] is None
