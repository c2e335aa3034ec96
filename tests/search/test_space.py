"""The search space: fitted to a model (groups, bounds, refusals said), the --space file validated strictly, and
every choice a sampler can draw making a recipe that really applies to the model (no refused combination)."""

import optuna
import pytest
import torch

import vitcompress
from vitcompress.errors import RecipeError, TargetError
from vitcompress.models import load_model
from vitcompress.recipe import Recipe
from vitcompress.search.space import (
    Choice,
    GroupChoice,
    SearchSpace,
    choice_params,
    load_space,
    merge_schedule,
    recipe_for,
    resolve_space,
    suggest,
)

NOISE = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    """The reference architecture, 4 blocks, random weights."""
    return load_model("vit_fmnist", None, True, {"depth": 4}).model


@pytest.fixture(scope="module")
def space(tiny):
    return resolve_space(SearchSpace(), tiny, (1, 28, 28), lambda: [NOISE])


def test_the_default_space_fits_the_model(space):
    assert space.depth == 4 and space.tokens == 50
    assert space.groups == [[0], [1], [2], [3]]
    assert space.refused == {}
    assert space.max_skip == 2 and len(space.skip_order) == 2 and set(space.skip_order) <= {0, 1, 2, 3}
    assert space.r_max == (50 - 1) * 3 // 4 // 4  # keeps a quarter of the tokens after 4 blocks
    # per group: 4 ranks + taylor + shift; then r, skip, quantize
    assert space.dimensions == 4 * 6 + 3


def test_a_transform_the_architecture_refuses_leaves_the_space_with_its_reason(tiny):
    average_pooled = load_model("vit_fmnist", None, True, {"depth": 2, "global_pool": "avg"}).model
    resolved = resolve_space(SearchSpace(), average_pooled, (1, 28, 28), lambda: [NOISE])
    assert set(resolved.refused) == {"token_merge"}
    assert "global_pool 'avg'" in resolved.refused["token_merge"]
    assert resolved.r_max == 0


def test_space_file_is_strict_with_key_paths(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("token_merge: {r_max: 3, schedule: [constant]}\n")
    with pytest.raises(RecipeError, match=r"space.yaml: token_merge.schedule: unknown key \(allowed: r_max"):
        load_space(bad)
    bad.write_text("rank_ratios: [0.5, 1.5]\n")
    with pytest.raises(RecipeError, match="rank_ratios: .*between 0 and 1"):
        load_space(bad)
    bad.write_text("- not a mapping\n")
    with pytest.raises(RecipeError, match="a search space is a mapping"):
        load_space(bad)
    with pytest.raises(RecipeError, match="is not a file"):
        load_space(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("groups: 2\nrank_ratios: [0.25]\ntaylor: false\ntoken_merge: null\nquantize: [none]\n")
    loaded = load_space(good)
    assert loaded.groups == 2 and loaded.token_merge is None and loaded.attention_skip is not None


def test_more_groups_than_blocks_is_refused(tiny):
    with pytest.raises(RecipeError, match="5 groups, but the model has 4 blocks"):
        resolve_space(SearchSpace(groups=5), tiny, (1, 28, 28), lambda: [NOISE])


def test_a_model_without_blocks_is_refused():
    with pytest.raises(TargetError, match="no transformer blocks"):
        resolve_space(SearchSpace(), torch.nn.Linear(2, 2), (2,), lambda: [NOISE])


def test_the_decreasing_schedule_merges_as_many_tokens_as_the_constant_one():
    assert merge_schedule(3, "constant", [0, 1, 2]) == [3, 3, 3]
    assert merge_schedule(3, "decreasing", [0, 1, 2, 3]) == [6, 4, 2, 0]
    assert merge_schedule(2, "decreasing", [5]) == [2]


def test_params_round_trip_through_suggest(space):
    choice = Choice(groups=[GroupChoice(ranks={"qkv": 0.25, "fc1": 0.125}, taylor=True), GroupChoice(shift_mlp=True),
                            GroupChoice(ranks={"proj": 0.375}), GroupChoice()],
                    skip=1, r=2, schedule="decreasing", quantize="dynamic")
    assert suggest(optuna.trial.FixedTrial(choice_params(choice, space)), space) == choice


def test_every_sampled_choice_applies_to_the_model(tiny, space):
    """Random draws from the whole space (Taylor before merging blocks, skipped blocks, shift and SVD) each make
    a recipe whose steps apply to the model and whose result runs: the order and exclusions of recipe_for hold."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        choice = suggest(trial, space)
        recipe = recipe_for(choice, space, Recipe(model="vit_fmnist"))
        model = vitcompress.apply(load_model("vit_fmnist", None, True, {"depth": 4}).model, recipe, NOISE)
        assert model(NOISE[:2]).shape == (2, 10)
        assert recipe.export.quantize == choice.quantize
        seen |= {step.transform for step in recipe.steps}
        study.tell(trial, 0.0)
    assert seen == {"svd_lowrank", "taylor_attention", "shift_linear", "token_merge", "attention_skip"}


def test_recipe_for_names_the_skipped_blocks_and_merges_only_after_taylor(space):
    choice = Choice(groups=[GroupChoice(taylor=True), GroupChoice(), GroupChoice(), GroupChoice()], skip=1, r=2)
    recipe = recipe_for(choice, space, Recipe(model="vit_fmnist"))
    skip, taylor, merge = recipe.steps
    assert skip.blocks == [space.skip_order[0]]
    assert taylor.targets == [r"re:blocks\.(0)\.attn"]
    assert merge.targets == [f"blocks.{b}" for b in (1, 2, 3) if b != space.skip_order[0]]
