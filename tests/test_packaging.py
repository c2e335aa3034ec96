"""The built wheel: every package of the source tree, the shipped recipes as vitcompress/recipes/*.yaml, the
reference model's weights, and recipe names resolving to files inside the installed copy (not the source
checkout)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_every_source_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vitcompress").rglob("__init__.py")}
    data_only = {"vitcompress.recipes", "vitcompress.weights", "vitcompress.deploy.templates"}  # no __init__.py
    assert found | data_only == listed


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_resolves_names(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("vitcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"vitcompress/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= names
    assert {f"vitcompress/{p.relative_to(ROOT / 'vitcompress')}" for p in (ROOT / "vitcompress").rglob("*.py")} <= names
    assert {"vitcompress/weights/vit_fmnist.safetensors", "vitcompress/weights/vit_fmnist196.safetensors"} <= names
    templates = {f"vitcompress/page/templates/{p.name}" for p in (ROOT / "vitcompress/page/templates").glob("*.j2")}
    assert len(templates) == 3 and templates <= names  # report.html and index.html are rendered from them
    target, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=tmp_path)
    code = "from vitcompress.recipe import resolve_recipe; print(resolve_recipe('shiftadd'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=empty, env={**os.environ, "PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True).stdout.strip()
    assert Path(out) == target / "vitcompress" / "recipes" / "shiftadd.yaml"
