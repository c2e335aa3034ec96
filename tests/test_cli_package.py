"""The shape of the CLI package: ``--help`` stays fast and torch-free, every command's help works, command
modules never import ``cli.main``, and no module of the package grows past the size limit."""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_imports import GRAPH, MODULES, in_layer

ROOT = Path(__file__).parent.parent
#: Heavy libraries the CLI imports only inside the commands that need them.
HEAVY = {"torch", "timm", "torchvision", "onnx", "onnxruntime", "numpy"}
#: Lines a module of the vitcompress package may have.
MAX_LINES = 450
#: Modules still over MAX_LINES, with their size when they were listed: a listed module may shrink, never grow,
#: and leaves the list once it is under the limit.
OVER_THE_LIMIT: dict[str, int] = {}


def test_help_imports_no_heavy_library_and_loads_the_cli_in_under_a_second():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "vitcompress", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and "Usage:" in run.stdout, run.stderr
    rows = [line.split("|") for line in run.stderr.splitlines() if line.startswith("import time:")][1:]
    imported = {name.strip(): int(cumulative) for _, cumulative, name in rows}
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, f"vitcompress --help imported {heavy[:5]}"
    assert imported["vitcompress.cli"] < 1_000_000, f"importing the CLI took {imported['vitcompress.cli']} µs"


def test_every_command_and_group_answers_help_without_torch():
    """Every command, hidden ones included, in one fresh interpreter: ``--help`` exits 0 with its usage, and
    torch is still unimported afterwards."""
    script = """
import json, sys
from click.testing import CliRunner
from vitcompress.cli import main

def walk(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, [*path, name])

results = {" ".join(path): CliRunner().invoke(main, [*path, "--help"], prog_name="vitcompress").output
           for path in walk(main, [])}
print(json.dumps({"results": results, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (sorted(HEAVY),)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["heavy"] == []
    commands = set(out["results"])
    assert {"", "convert", "plan", "profile", "recipes", "verify", "predict", "export triton", "export optimized",
            "batch run", "batch merge", "batch remeasure"} <= commands, sorted(commands)
    for path, output in out["results"].items():
        assert output.startswith(f"Usage: vitcompress {path}".rstrip() + " "), (path, output)


def test_python_dash_m_vitcompress_cli_runs_the_command_line():
    run = subprocess.run([sys.executable, "-m", "vitcompress.cli", "batch", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and "batch merge shard*/batch.json" in run.stdout, run.stderr


def test_command_modules_never_import_the_main_group():
    """Commands are standalone: only the package's ``__init__`` and ``__main__`` import ``cli.main``."""
    importers = {m for m in MODULES if in_layer(m, "cli") and "vitcompress.cli.main" in GRAPH[m]}
    assert importers <= {"vitcompress.cli", "vitcompress.cli.__main__"}, sorted(importers)


def test_no_module_is_over_the_line_limit_except_the_listed_ones_which_only_shrink():
    sizes = {str(p.relative_to(ROOT)): p.read_text().count("\n") for p in (ROOT / "vitcompress").rglob("*.py")}
    over = {path: n for path, n in sizes.items() if n > MAX_LINES and path not in OVER_THE_LIMIT}
    assert not over, f"over {MAX_LINES} lines (split them): {over}"
    for path, listed in OVER_THE_LIMIT.items():
        assert path in sizes, f"{path} is gone: remove it from OVER_THE_LIMIT"
        assert sizes[path] <= listed, f"{path} grew from {listed} to {sizes[path]} lines: split it instead"
        assert sizes[path] > MAX_LINES, f"{path} is down to {sizes[path]} lines: remove it from OVER_THE_LIMIT"
