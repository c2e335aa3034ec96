import pytest
from torch import nn

from vitcompress.errors import TargetError
from vitcompress.transforms.select import blocks_needed, check_selector, parse_selector, replace_module, select_modules


def names(model, targets, ignore=(), kinds=(nn.Linear,)):
    return [n for n, _ in select_modules(model, list(targets), list(ignore), kinds, "test")]


def test_exact_glob_regex_and_class_selectors(reference_model):
    assert names(reference_model, ["blocks.0.mlp.fc1"]) == ["blocks.0.mlp.fc1"]
    assert len(names(reference_model, ["blocks.*.mlp.fc2"])) == 12
    assert len(names(reference_model, [r"re:blocks\.\d+\.mlp\.fc[12]"])) == 24
    # class selector: every Linear (qkv, proj, fc1, fc2 per block + head)
    assert len(names(reference_model, ["Linear"])) == 12 * 4 + 1


def test_ignore_removes_matches(reference_model):
    picked = names(reference_model, ["blocks.*.mlp.fc1"], ignore=["blocks.11.mlp.fc1", "re:blocks\\.[0-3]\\..*"])
    assert picked == [f"blocks.{i}.mlp.fc1" for i in range(4, 11)]


@pytest.mark.parametrize("targets, ignore, message", [
    (["blocks.99.mlp.fc1"], [], "matches no module"),
    (["blocks.*.mlp"], [], "not a Linear"),
    (["blocks.0.mlp.fc1"], ["blocks.0.nothing"], "ignore 'blocks.0.nothing' matches no module"),
    (["blocks.0.mlp.fc1"], ["blocks.0.mlp.fc1"], "nothing left"),
    (["re:blocks.(["], [], "not a valid regex"),
])
def test_selector_errors(reference_model, targets, ignore, message):
    with pytest.raises(TargetError, match=message):
        names(reference_model, targets, ignore)


def test_replace_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3)))
    replace_module(model, "1.0", nn.Identity())
    assert isinstance(model[1][0], nn.Identity)


# ---------------------------------------------------------------------------------------------- roles, depth

def vit(depth: int) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, embed_dim=16, num_heads=1,
                             img_size=32, num_classes=2)


@pytest.mark.parametrize("selector", [
    "role:mlp.fc1", "role:mlp.fc2", "role:attn.qkv", "role:attn.proj", "role:mlp.fc1[-1]", "role:attn.qkv[0.5:]",
    "blocks[-1]", "blocks[0]", "blocks[-3:]", "blocks[:2]", "blocks[0.25:0.75]", "blocks[:]", "blocks[-2:].attn",
    "blocks[1:].mlp.*", "blocks.*.mlp.fc[12]", "Linear", "re:blocks\\.\\d+\\.attn",
])
def test_good_selectors_parse(selector):
    assert check_selector(selector) == selector


@pytest.mark.parametrize("selector, message", [
    ("role:mlp", "unknown role 'mlp'"),
    ("role:attn.qkv.x", "unknown role 'attn.qkv.x'"),
    ("role:mlp.fc1[-1].x", "nothing may follow the block positions of a role"),
    ("blocks[x]", r"\[x\] is not an index"),
    ("blocks[1:2:3]", r"\[1:2:3\] is not an index"),
    ("blocks[]", r"\[\] is not an index"),
    ("blocks[0.5]", r"\[0.5\] is not an index"),
    ("blocks[1.5:]", "fraction 1.5 is outside 0..1"),
    ("blocks[-1]attn", r"after blocks\[…\] comes nothing or .<path>"),
    ("blocks[-1].", r"after blocks\[…\] comes nothing or .<path>"),
    ("blocks[-1][0]", "unbalanced or repeated"),
    ("blocks[-1", "unbalanced or repeated"),
    ("roles:mlp.fc1", "unknown prefix 'roles'"),
    ("re:blocks.([", "not a valid regex"),
    (" blocks.0", "leading or trailing spaces"),
    ("", "empty"),
])
def test_bad_selectors_are_one_line_errors(selector, message):
    with pytest.raises(TargetError, match=message) as info:
        parse_selector(selector)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("selector, message", [
    ("role:mlp.fc1[-13]", "block -13 is outside the model's 12 blocks"),
    ("blocks[12]", "block 12 is outside the model's 12 blocks"),
    ("blocks[-20:]", "bound -20 is outside the model's 12 blocks"),
    ("blocks[5:2]", r"\[5:2\] selects no block of the model's 12"),
    ("blocks[-1].nothing", "matches no module"),
])
def test_selectors_outside_the_model_are_target_errors(reference_model, selector, message):
    with pytest.raises(TargetError, match=message):
        names(reference_model, [selector], kinds=(nn.Module,))


def test_roles_and_relative_depth_on_the_reference_model_equal_the_fixed_names(reference_model):
    """The shipped recipes' role selectors mean on vit_fmnist exactly what their regexes and names meant."""
    assert names(reference_model, ["role:mlp.fc1", "role:mlp.fc2"]) == names(
        reference_model, [r"re:blocks\.\d+\.mlp\.fc[12]"])
    assert names(reference_model, ["role:attn.qkv", "role:attn.proj", "role:mlp.fc1", "role:mlp.fc2"],
                 ignore=["role:mlp.fc1[-1]"]) == names(
        reference_model, [r"re:blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"], ignore=["blocks.11.mlp.fc1"])
    assert names(reference_model, ["blocks[-2:].attn"], kinds=(nn.Module,)) == ["blocks.10.attn", "blocks.11.attn"]


@pytest.mark.parametrize("depth", [2, 6, 12])
def test_relative_depth_selects_the_same_relative_blocks_at_any_depth(depth):
    model = vit(depth)
    assert names(model, ["blocks[-1].mlp.fc1"]) == [f"blocks.{depth - 1}.mlp.fc1"]
    assert names(model, ["blocks[-2:].attn"], kinds=(nn.Module,)) == [f"blocks.{depth - 2}.attn",
                                                                      f"blocks.{depth - 1}.attn"]
    assert names(model, ["role:mlp.fc2[0.5:]"]) == [f"blocks.{i}.mlp.fc2" for i in range(depth // 2, depth)]
    assert names(model, ["blocks[:0.5]"], kinds=(nn.Module,)) == [f"blocks.{i}" for i in range(depth // 2)]
    assert names(model, ["role:attn.qkv"], ignore=["role:attn.qkv[-1]"]) == [
        f"blocks.{i}.attn.qkv" for i in range(depth - 1)]


@pytest.mark.parametrize("depth", [2, 6, 12])
def test_shipped_shiftadd_resolves_to_the_last_blocks_at_any_depth(depth):
    """recipes/shiftadd.yaml on a 2-, 6- and 12-block model: binary attention in the last two blocks, the MoE on
    the last fc1 and the shift Linears everywhere else; the resolved recipe records the concrete modules."""
    from vitcompress.pipeline import concrete_recipe
    from vitcompress.recipe import load_recipe

    recipe = concrete_recipe(vit(depth), load_recipe("shiftadd"))
    shift, attention, moe = recipe.steps
    last = depth - 1
    assert shift.ignore == [f"blocks.{last}.mlp.fc1"] and len(shift.targets) == 4 * depth
    assert attention.targets == [f"blocks.{depth - 2}.attn", f"blocks.{last}.attn"]
    assert moe.targets == [f"blocks.{last}.mlp.fc1"]


def test_block_counts_a_smoke_copy_needs():
    assert [blocks_needed(s) for s in ("blocks[-1]", "blocks[-3:]", "blocks[4]", "blocks[2:]", "blocks[:5]",
                                       "blocks[:-2]", "blocks[0.5:]", "role:mlp.fc1", "role:mlp.fc1[-2]",
                                       "blocks.11.attn", "re:blocks\\.3\\.mlp")] == [1, 3, 5, 3, 5, 3, 1, 0, 2, 12, 4]
