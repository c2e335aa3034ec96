"""The import rules of docs/architecture.md, read from the source with ast (imports inside functions count too).

cli → api → stages → transforms → layers; deploy/, export, errors and the torch-only helpers are leaves that
the rest may use. A stage imports no other stage; bench/, the CLI, the planner and the sensitivity map import no
stage; training/ takes explicit arguments (no run context, stage or pipeline); nothing under deploy/ imports torch,
timm or the ONNX exporter, and reading a recipe imports neither torch nor onnx (both checked in a fresh
interpreter). No cycle anywhere.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "vitcompress"
#: Modules any layer may use: they import nothing of vitcompress but each other.
LEAVES = {"vitcompress.errors", "vitcompress.hooks", "vitcompress.cka", "vitcompress.files", "vitcompress.quantize",
          "vitcompress.progress", "vitcompress.export_config",
          "vitcompress.deploy", "vitcompress.deploy.runtime", "vitcompress.deploy.bundle", "vitcompress.deploy.predict",
          "vitcompress.deploy.triton", "vitcompress.deploy.optimize", "vitcompress.deploy.timing_lock",
          "vitcompress.deploy.cpus", "vitcompress.deploy.templates.predict"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path | None = None) -> set[str]:
    """The vitcompress modules that ``name`` (at ``path``, default its file in the package) imports anywhere in its
    source (``from pkg import sub`` → sub)."""
    path = path or MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def in_layer(module: str, layer: str) -> bool:
    return module == f"vitcompress.{layer}" or module.startswith(f"vitcompress.{layer}.")


@pytest.mark.parametrize("name", [m for m in MODULES if in_layer(m, "layers")])
def test_layers_import_only_layers_and_leaves(name):
    above = {m for m in GRAPH[name] if not in_layer(m, "layers") and m not in LEAVES}
    assert not above, f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", [m for m in MODULES if in_layer(m, "transforms")])
def test_transforms_never_import_stages_cli_or_api(name):
    forbidden = {m for m in GRAPH[name] if in_layer(m, "stages") or in_layer(m, "cli")
                 or m in {"vitcompress.api", "vitcompress.planner"}}
    assert not forbidden, f"{name} imports {sorted(forbidden)}"


def test_leaves_import_only_leaves():
    for leaf in LEAVES:
        assert GRAPH[leaf] <= LEAVES, f"{leaf} imports {sorted(GRAPH[leaf] - LEAVES)}"


def test_export_is_below_stages_and_transforms():
    allowed = {m for m in MODULES if in_layer(m, "layers")} | LEAVES
    assert GRAPH["vitcompress.export"] <= allowed, sorted(GRAPH["vitcompress.export"] - allowed)


@pytest.mark.parametrize("name", [m for m in MODULES if in_layer(m, "deploy")])
def test_deploy_source_never_names_torch(name):
    tree = ast.parse(MODULES[name].read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert roots.isdisjoint({"torch", "timm", "torchvision"}), roots


def test_importing_deploy_loads_no_torch_timm_or_exporter():
    """Every module under deploy/, imported in a fresh interpreter, leaves torch, timm and the ONNX exporter
    unloaded: a deployment installs onnxruntime, not torch."""
    names = [m for m in MODULES if in_layer(m, "deploy")]
    code = (f"import importlib, json, sys\nfor name in {names!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')"
            " or m.startswith('vitcompress.export'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert loaded == [], f"importing deploy/ loaded {loaded[:5]}"


def test_the_pages_load_no_torch():
    """``vitcompress report`` and a batch's index.html rebuild pages from files: importing vitcompress.page (in a
    fresh interpreter) leaves torch and timm unloaded."""
    names = [m for m in MODULES if in_layer(m, "page")]
    code = (f"import importlib, json, sys\nfor name in {names!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert len(names) >= 4 and loaded == [], f"importing page/ loaded {loaded[:5]}"


HEAVY = ("torch", "timm", "torchvision", "onnx", "onnxruntime", "onnxscript")

READ_RECIPES = """
import json, sys
from click.testing import CliRunner
from vitcompress.cli.main import main
from vitcompress.recipe import Recipe, dump_recipe, load_recipe, parse_recipe, shipped_recipes
from vitcompress.transforms import registry

for name in shipped_recipes():
    recipe = load_recipe(name)
    parse_recipe(recipe.model_dump(mode="json", by_alias=True), name)
    dump_recipe(recipe)
Recipe.model_json_schema()
for transform in registry.available().values():
    transform.config.model_json_schema()
listing = CliRunner().invoke(main, ["recipes"])
assert listing.exit_code == 0, listing.output
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


def test_reading_recipes_loads_no_torch_timm_or_onnx():
    """Loading, validating and dumping every shipped recipe, the JSON schemas and ``vitcompress recipes``, in a
    fresh interpreter, leave torch, timm, onnx and onnxruntime unloaded: the transforms' config classes need only
    pydantic, their handlers import torch when they run."""
    code = f"HEAVY = {HEAVY!r}\n{READ_RECIPES}"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert loaded == [], f"reading recipes loaded {loaded[:5]}"


@pytest.mark.parametrize("name", [m for m in MODULES if in_layer(m, "stages") and m != "vitcompress.stages"])
def test_a_stage_imports_no_other_stage(name):
    others = {m for m in GRAPH[name] if in_layer(m, "stages") and m != name}
    assert not others, f"{name} imports {sorted(others)}"


def test_every_stage_file_is_a_stage():
    """stages/ holds stages only: every module there defines ``run``, and api.STAGES runs each once."""
    stages = [m for m in MODULES if in_layer(m, "stages") and m != "vitcompress.stages"]
    for name in stages:
        tree = ast.parse(MODULES[name].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), f"{name} has no run()"
    from vitcompress.api import STAGES

    assert sorted(stage.__name__ for stage in STAGES) == sorted(stages)


@pytest.mark.parametrize("name", [m for m in MODULES if in_layer(m, "training")])
def test_training_imports_no_context_stage_or_pipeline(name):
    """The fine-tune loop and its helpers take explicit arguments: a RunContext is the stages' business."""
    forbidden = {m for m in GRAPH[name]
                 if in_layer(m, "stages") or m in {"vitcompress.context", "vitcompress.pipeline"}}
    assert not forbidden, f"{name} imports {sorted(forbidden)}"


BENCH = {f"bench.{p.stem}": p for p in sorted((ROOT / "bench").glob("*.py"))}


@pytest.mark.parametrize("name", [*BENCH, *(m for m in MODULES if in_layer(m, "cli")
                                            or m in {"vitcompress.planner", "vitcompress.sensitivity_map"})])
def test_bench_cli_and_planner_import_no_stage(name):
    imports = imports_of(name, BENCH.get(name))
    stages = {m for m in imports if in_layer(m, "stages")}
    assert not stages, f"{name} imports {sorted(stages)}: use vitcompress.evaluate, measure or pipeline"


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for child in sorted(GRAPH[name]):
            if state.get(child) == "open":
                cycle = path[path.index(child):] + [child] if child in path else [name, child]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if child not in state:
                visit(child, path + [child])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_only_the_cli_imports_batch_and_batch_runs_the_pipeline_in_subprocesses():
    """batch sits beside api: cli → batch; batch never imports api, cli, planner or the stages (it runs
    ``python -m vitcompress convert`` per job), and nothing below the CLI imports it."""
    users = {m for m, imports in GRAPH.items()
             if any(in_layer(i, "batch") for i in imports) and not in_layer(m, "batch")}
    assert all(in_layer(m, "cli") for m in users), sorted(users)
    for name in (m for m in MODULES if in_layer(m, "batch")):
        forbidden = {m for m in GRAPH[name] if in_layer(m, "stages") or in_layer(m, "cli")
                     or m in {"vitcompress.api", "vitcompress.planner"}}
        assert not forbidden, f"{name} imports {sorted(forbidden)}"


def test_the_search_sits_beside_the_api_and_imports_no_stage():
    """search/ (vitcompress tune) runs conversions through api.convert and measures through the library, like
    bench/; only the CLI imports it (``vitcompress.tune`` reaches it lazily by name)."""
    for name in (m for m in MODULES if in_layer(m, "search")):
        stages = {m for m in GRAPH[name] if in_layer(m, "stages") or in_layer(m, "cli")}
        assert not stages, f"{name} imports {sorted(stages)}"
    users = {m for m, imports in GRAPH.items() if any(in_layer(i, "search") for i in imports)
             and not in_layer(m, "search")}
    assert all(in_layer(m, "cli") for m in users), sorted(users)
