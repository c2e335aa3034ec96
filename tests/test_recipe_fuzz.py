"""Property-based fuzzing of the recipe loader and ``--set``: whatever the input, a valid Recipe or a
VitCompressError (one line for the CLI), never another exception."""

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitcompress.errors import VitCompressError
from vitcompress.recipe import Recipe, load_recipe, parse_recipe
from vitcompress.transforms import registry

RECIPES = Path(__file__).parent.parent / "recipes"
SECTIONS = ["model", "steps", "calibration", "finetune", "export", "validate", "cascade"]
FIELDS = sorted({name for t in registry.available().values() for name in t.config.model_fields}
                | {"steps", "lr", "batch_size", "images", "opset", "threads", "batch_sizes", "distill", "stages",
                   "low", "high", "low_effort_fraction", "latency_runs", "max_abs_diff", "device"})
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=16) | st.sampled_from(sorted(registry.available())))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
                      max_leaves=24)
steps = st.lists(st.fixed_dictionaries({"transform": st.sampled_from(sorted(registry.available()))},
                                       optional={k: values for k in FIELDS if k != "transform"}), max_size=3)
recipes = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8), values, max_size=6) | st.builds(
    lambda base, s: {**base, "steps": s}, st.dictionaries(st.sampled_from(SECTIONS), values, max_size=4), steps)


def outcome(load) -> Recipe | None:
    """The recipe, or None when the loader refused it with a VitCompressError; anything else fails the test."""
    try:
        return load()
    except VitCompressError as exc:
        assert str(exc) and "\n" not in str(exc), f"error is not one line: {exc!r}"
        return None


@SETTINGS
@given(recipes)
def test_any_mapping_is_a_recipe_or_a_recipe_error(data):
    recipe = outcome(lambda: parse_recipe(data, "fuzz.yaml"))
    if recipe is not None:
        assert isinstance(recipe, Recipe)


@SETTINGS
@given(st.text(max_size=400) | recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
def test_any_file_text_is_a_recipe_or_a_recipe_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    outcome(lambda: load_recipe(path))


keys = st.lists(st.sampled_from(SECTIONS + FIELDS + ["0", "1", "9"]) | st.text(max_size=6), min_size=1, max_size=4)
overrides = st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{'.'.join(k)}={v}", keys,
                                                       st.text(max_size=20) | scalars.map(str)), max_size=4)


@SETTINGS
@given(st.sampled_from(sorted(RECIPES.glob("*.yaml"))), overrides)
def test_any_set_override_is_a_recipe_or_a_recipe_error(path, items):
    outcome(lambda: load_recipe(path, items))
