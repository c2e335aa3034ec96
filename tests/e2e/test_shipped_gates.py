"""Every shipped recipe passes its own gates on a CPU: with its full budget in the bench (its results must be
current and passing), and through the CLI on a budget here.

The full-budget runs take minutes to tens of minutes each on 2 cores (taylor: 20), too long for ``make test``; so
the bench's results file of each recipe records the digest of the recipe it measured, and the first test fails
when a recipe changed since (re-run ``python bench/run.py --recipes NAME``) or when an as-shipped row failed a
gate. The budget runs convert with a few fine-tune steps and images, where accuracy gates cannot be met and only
the parity gate is asserted; recipes that other tests already run through the whole pipeline are not run twice.
"""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.recipe import load_recipe, shipped_recipes

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from run import LATENCY_MODEL, REFERENCE, recipe_sha256  # noqa: E402

BENCH_RESULTS = Path(__file__).parents[2] / "bench" / "results"
# Recipes another test already converts end to end (test: what it checks beyond the gates).
RUN_ELSEWHERE = {"svd": "test_cli.py (JSON report)", "fast": "test_fast_recipe.py (both models)",
                 "cascade": "test_cascade.py (cascade bundle)", "shiftadd": "test_cli.py (DeiT-S from any directory)",
                 "shiftadd_paper": "transforms/test_shiftadd.py (staged fine-tune, expert shares)",
                 "taylor": "transforms/test_taylor.py (CLI, every block, fine-tune steps)",
                 "taylor_384": "transforms/test_taylor.py (CLI, ViT-S/384, fewer MACs)"}


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_bench_measured_this_recipe_on_a_cpu_and_its_as_shipped_rows_pass_its_gates(name):
    path = BENCH_RESULTS / f"{name}.json"
    assert path.is_file(), f"no bench results for {name}: run python bench/run.py --recipes {name}"
    results = json.loads(path.read_text())
    assert results.get("recipe_sha256") == recipe_sha256(shipped_recipes()[name]), \
        f"{name} changed since the bench measured it: run python bench/run.py --recipes {name}"
    shipped = [row for row in results["rows"] if row["variant"] == name]
    models = {row["model"] for row in shipped}
    model = load_recipe(shipped_recipes()[name]).model or REFERENCE
    assert models == ({REFERENCE, LATENCY_MODEL} if model in (REFERENCE, LATENCY_MODEL) else {model})
    for row in shipped:
        assert row["failed_gates"] == [], f"{name} on {row['model']} fails {row['failed_gates']}"
        assert row["finetune"] is None or row["finetune"]["device"] == "cpu", "a GPU fine-tune is no CPU evidence"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(shipped_recipes()) - set(RUN_ELSEWHERE)))
def test_shipped_recipe_converts_through_the_cli_on_a_budget(name, tmp_path):
    recipe = load_recipe(shipped_recipes()[name])
    budget, options = [*FAST, "validate.batch_sizes=[1]"], []
    if recipe.model and recipe.model != REFERENCE:  # a latency recipe for a large model: random weights
        budget, options = [*budget, "validate.images=8"], ["--random-init", "--data", "synthetic"]
    args = ["convert", "--recipe", name, "--out", str(tmp_path / "run"), *options]
    result = CliRunner().invoke(main, [*args, *(x for item in budget for x in ("--set", item))])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert result.exit_code == (1 if report["failed_gates"] else 0), result.output
    assert [s["transform"] for s in report["steps"]] == [s.transform for s in recipe.steps]
    parity = next(g for g in report["validation"]["gates"] if g["gate"] == "max_abs_diff")
    assert parity["passed"], parity
