import pytest
from torch import nn

from vitcompress.errors import TargetError
from vitcompress.transforms.select import replace_module, select_modules


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
