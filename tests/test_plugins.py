"""The transform registry keyed by config class, and third-party transforms brought in by a recipe's
``plugins:`` or a ``vitcompress.transforms`` entry point (vitcompress/plugins.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vitcompress
from vitcompress.cli import main
from vitcompress.errors import RecipeError
from vitcompress.recipe import dump_recipe, load_recipe
from vitcompress.transforms import registry
from vitcompress.transforms.lowrank import LowRankConfig
from vitcompress.transforms.registry import TransformConfig, TransformNameTaken, load_entry_points, register

ROOT = Path(__file__).parent.parent
_numbers = itertools.count()

PLUGIN = '''
from typing import Literal
from pydantic import Field
from torch import nn
from vitcompress.transforms.registry import TransformConfig, register
from vitcompress.transforms.select import select_modules

class ZeroBiasConfig(TransformConfig):
    transform: Literal["{name}"] = "{name}"
    targets: list[str] = Field(default_factory=lambda: ["blocks.*.mlp.fc2"])
    scale: float = Field(0.0, ge=0)

@register(ZeroBiasConfig)
def zero_bias(model, config, inputs):
    """Scale the biases of the target Linears."""
    targets = select_modules(model, config.targets, config.ignore, (nn.Linear,), config.transform)
    for _, linear in targets:
        linear.bias.data.mul_(config.scale)
    return [name for name, _ in targets]
'''


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy of the registry, and the modules it imports are forgotten after it."""
    monkeypatch.setattr(registry, "_TRANSFORMS", dict(registry._TRANSFORMS))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("plug_", "vitcompress_plugin_", "ep_")):
            del sys.modules[name]


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_numbers)}_{id(_numbers) % 10_000}"


def write_plugin(folder: Path, module: str, transform: str) -> Path:
    path = folder / f"{module}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PLUGIN.format(name=transform))
    return path


def write_recipe(folder: Path, plugins: str, transform: str, extra: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"plugins: {plugins}\nsteps:\n  - {{transform: {transform}{extra}}}\n")
    return path


# ----------------------------------------------------------------------------------------------------- registry


def test_every_builtin_is_keyed_by_its_config_class_and_named_by_its_transform_field():
    transforms = registry.available()
    assert {"svd_lowrank", "taylor_attention", "shift_linear", "shiftadd_moe", "attention_skip"} <= set(transforms)
    for name, transform in transforms.items():
        assert registry.transform_name(transform.config) == name
        assert registry.for_config(transform.config) is transform and registry.get(name) is transform
    assert registry.for_config(LowRankConfig(rank=4)).name == "svd_lowrank"


def test_register_takes_the_name_from_the_config_and_refuses_a_taken_one():
    class Mine(TransformConfig):
        transform: Literal["mine"] = "mine"

    class Impostor(TransformConfig):
        transform: Literal["svd_lowrank"] = "svd_lowrank"

    class Nameless(TransformConfig):
        pass

    @register(Mine)
    def apply_mine(model: nn.Module, config: Mine, inputs) -> list[str]:
        return []

    assert registry.get("mine").apply is apply_mine and registry.for_config(Mine) is registry.get("mine")
    with pytest.raises(TransformNameTaken, match="'svd_lowrank'.*already taken by vitcompress.transforms.lowrank"):
        register(Impostor)
    with pytest.raises(TypeError, match="no name"):
        register(Nameless)
    assert registry.get("svd_lowrank").config is LowRankConfig


# ------------------------------------------------------------------------------------------- recipe plugins:


def test_a_recipe_plugin_from_the_recipe_folder_validates_strictly_and_applies(tmp_path):
    module, name = unique("plug"), unique("zero_bias")
    write_plugin(tmp_path, module, name)
    recipe = load_recipe(write_recipe(tmp_path, f"[{module}]", name, ", scale: 0.5"))
    assert type(recipe.steps[0]).__name__ == "ZeroBiasConfig" and recipe.steps[0].scale == 0.5
    assert f"plugins:\n- {module}\n" in dump_recipe(recipe)
    assert load_recipe(write_recipe(tmp_path, f"[{module}]", name)).steps[0].transform == name  # imported once
    with pytest.raises(RecipeError, match=r"recipe.yaml: steps\.0\.sclae: unknown key \(allowed: .*scale"):
        load_recipe(write_recipe(tmp_path, f"[{module}]", name, ", sclae: 0.5"))
    with pytest.raises(RecipeError, match=r"steps\.0\.scale: Input should be greater than or equal to 0"):
        load_recipe(write_recipe(tmp_path, f"[{module}]", name, ", scale: -1"))
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                              num_heads=2)
    nn.init.ones_(model.blocks[0].mlp.fc2.bias)
    vitcompress.apply(model, recipe.steps[0])
    assert model.blocks[0].mlp.fc2.bias.tolist() == [0.5] * 32


def test_a_recipe_plugin_may_be_a_py_file_relative_to_the_recipe(tmp_path, monkeypatch):
    name = unique("zero_bias")
    write_plugin(tmp_path / "transforms", "prune", name)
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(write_recipe(tmp_path, "[transforms/prune.py]", name))
    assert recipe.steps[0].transform == name and recipe.plugins == ["transforms/prune.py"]
    assert load_recipe(tmp_path / "recipe.yaml").steps[0].transform == name  # the file is run once


def test_a_recipe_without_plugins_dumps_as_before():
    assert "plugins" not in dump_recipe(load_recipe("svd"))
    assert "plugins" not in load_recipe("svd").model_dump(mode="json", by_alias=True)


@pytest.mark.parametrize(("plugins", "message"), [
    ("[no_such_plugin_module]", r"plugins\.0: cannot import plugin 'no_such_plugin_module': ModuleNotFoundError"),
    ("[missing.py]", r"plugins\.0: plugin file .*missing\.py does not exist"),
    ("['not a module']", r"plugins\.0: 'not a module' is neither a module name nor a \.py file path"),
    ("some_module", r"plugins: a list of module names or \.py file paths"),
])
def test_a_plugin_that_cannot_be_imported_is_a_recipe_error(tmp_path, plugins, message):
    before = dict(registry._TRANSFORMS)
    with pytest.raises(RecipeError, match=f"recipe.yaml: {message}"):
        load_recipe(write_recipe(tmp_path, plugins, "svd_lowrank", ", rank: 2"))
    assert registry._TRANSFORMS == before


def test_a_plugin_that_raises_or_takes_a_builtin_name_registers_nothing(tmp_path):
    good, module = unique("zero_bias"), unique("plug")
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=good) + PLUGIN.replace("ZeroBias", "Other")
                                           .format(name="svd_lowrank"))
    with pytest.raises(RecipeError, match=rf"plugins\.0: plugin '{module}' registers transform 'svd_lowrank' "
                                          rf"\({module}\.OtherConfig\), a name already taken by "
                                          r"vitcompress\.transforms\.lowrank\.LowRankConfig"):
        load_recipe(write_recipe(tmp_path, f"[{module}]", good))
    assert registry.get(good) is None and module not in sys.modules
    broken = unique("plug")
    (tmp_path / f"{broken}.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(RecipeError, match=rf"plugins\.0: cannot import plugin '{broken}': RuntimeError: no GPU"):
        load_recipe(write_recipe(tmp_path, f"[{broken}]", "svd_lowrank"))


@pytest.mark.parametrize("case", ["unknown module", "name taken"])
def test_convert_with_a_bad_plugin_prints_one_error_line_exits_2_and_writes_nothing(tmp_path, case):
    module = unique("plug")
    if case == "name taken":
        write_plugin(tmp_path, module, "taylor_attention")
    recipe = write_recipe(tmp_path, f"[{module if case == 'name taken' else 'no_such_plugin_module'}]",
                          "taylor_attention")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--recipe", str(recipe), "--random-init",
                                       "--model-arg", "depth=1", "--data", "synthetic", "--out", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "plugins.0" in lines[0], result.output
    assert ("already taken" if case == "name taken" else "cannot import plugin") in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ entry points


def installed_plugin(folder: Path, value: str, module: str, transform: str) -> None:
    """A distribution as pip would install it: ``<name>.dist-info`` with METADATA and entry_points.txt."""
    write_plugin(folder, module, transform)
    dist = folder / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[vitcompress.transforms]\n{transform} = {value}\n")


def test_an_entry_point_registers_its_transform(tmp_path, monkeypatch):
    module, name = unique("ep"), unique("zero_bias")
    installed_plugin(tmp_path, f"{module}:ZeroBiasConfig", module, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_entry_points()
    assert registry.get(name).config.__module__ == module
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - {{transform: {name}, scale: 2}}\n")
    assert load_recipe(recipe).steps[0].scale == 2


def test_a_broken_entry_point_is_a_recipe_error_naming_it(tmp_path, monkeypatch):
    module = unique("ep")
    installed_plugin(tmp_path, f"{module}:nothing_here", module, unique("zero_bias"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match=rf"entry point \S+ = {module}:nothing_here \(group vitcompress.transforms, "
                                          rf"from {module}\): cannot load it: AttributeError"):
        load_entry_points()


def test_an_installed_plugin_is_found_at_the_first_lookup_of_a_new_process(tmp_path):
    module, name = unique("ep"), unique("zero_bias")
    installed_plugin(tmp_path, module, module, name)
    code = f"from vitcompress.transforms import registry; print(registry.get({name!r}).doc)"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "Scale the biases of the target Linears."
