"""The bench's own pieces: the ORT int8 baseline it compares with, and the Pareto frontier of its plot."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

from ort_int8 import quantized  # noqa: E402
from pareto import frontier, plot  # noqa: E402
from run import BENCH_OVERRIDES, LATENCY_ONLY, LATENCY_ONLY_OVERRIDES, ROOT, TIMED_ELSEWHERE, int8_rows, runs_of  # noqa: E402

from vitcompress.data import fmnist_dataset  # noqa: E402
from vitcompress.deploy.runtime import open_session  # noqa: E402
from vitcompress.evaluate import ort_predictions  # noqa: E402
from vitcompress.export import export_onnx  # noqa: E402
from vitcompress.models import load_model  # noqa: E402


def test_a_no_fine_tune_run_only_for_recipes_that_fine_tune():
    labels = {name: [label for _, label, _, _ in runs_of(ROOT / "recipes" / f"{name}.yaml")] for name in ("svd", "tome")}
    assert labels["svd"] == ["svd", "svd (no fine-tune)", "svd"]
    assert labels["tome"] == ["tome", "tome"], "tome has no fine-tune: a second run would repeat the first"


def test_frontier_keeps_only_points_no_other_beats_on_both():
    points = [(1.0, 88.5), (1.3, 88.4), (1.2, 88.0), (2.0, 85.0), (1.9, 86.0), (2.0, 84.0)]
    assert frontier(points) == [(1.0, 88.5), (1.3, 88.4), (1.9, 86.0), (2.0, 85.0)]


def test_plot_writes_a_png_of_the_reference_rows(tmp_path):
    def row(variant, speedup, top1):
        return {"model": "vit_fmnist", "variant": variant, "top1": top1, "top1_original": 88.47,
                "latency": {"b1": {"speedup": speedup}}}

    results = {"svd": {"rows": [row("svd", 1.3, 88.4), row("svd + ORT int8", 1.9, 88.3),
                                {**row("svd", 1.5, None), "model": "deit_s"}]}}
    path = plot(results, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot({"x": {"rows": [{**row("svd", 1.5, None), "model": "deit_s"}]}}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_ort_int8_baseline_quantises_the_matmuls_and_keeps_the_predictions(tmp_path):
    """On the shipped (trained) vit_fmnist weights: random weights give near-tied logits, where any rounding
    changes the prediction."""
    fp32 = export_onnx(load_model("vit_fmnist").model, tmp_path / "fp32.onnx")
    int8 = quantized(fp32, tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("MatMulInteger") == 4 * 12 + 1 and "MatMul" in ops  # every Linear; Q·Kᵀ and A·V stay float
    images = fmnist_dataset("test", 512)  # in the bench's evaluation batches: the activation scale is per batch
    want, got = (ort_predictions(open_session(p, threads=2), images, keep_logits=len(images)).head_logits
                 for p in (fp32, int8))
    assert np.mean(want.argmax(-1) == got.argmax(-1)) >= 0.98
    assert 0 < np.abs(want - got).max()


def test_token_count_variants_are_valid_overrides_of_shipped_recipes():
    from token_count import NO_GATES, variants

    from vitcompress.recipe import load_recipe

    root = Path(__file__).parent.parent / "recipes"
    for _, recipe, overrides in variants(steps=7):
        loaded = load_recipe(root / f"{recipe}.yaml", [*NO_GATES, *overrides])
        assert loaded.validate_.max_top1_drop is None
        if recipe == "tome":
            assert loaded.steps[0].r in (3, 8, 13)
        else:
            assert loaded.finetune is None or loaded.finetune.steps == 7


def test_every_run_override_applies_to_every_shipped_recipe():
    from vitcompress.recipe import load_recipe

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        for _, _, overrides, kwargs in runs_of(recipe):
            extra = LATENCY_ONLY_OVERRIDES if kwargs == LATENCY_ONLY else []
            loaded = load_recipe(recipe, [*overrides, *BENCH_OVERRIDES, *TIMED_ELSEWHERE, *extra])
            assert loaded.validate_.profile_runs == 0 and loaded.validate_.latency_runs == 3
            assert not extra or loaded.calibration.images == 64


def test_an_as_shipped_row_takes_its_latency_from_the_four_way_run():
    def timing(p50: float) -> dict:
        return {b: {"p50_ms": p50 * k, "p90_ms": p50 * k * 1.1, "spread": 0.2} for b, k in (("b1", 1), ("b8", 8))}

    four_way = {"latency": {"original": timing(10), "original + ORT int8": timing(6), "converted": timing(4),
                            "converted + ORT int8": timing(3)},
                "top1": {"converted + ORT int8": 88.0}, "agreement": {"converted + ORT int8": 0.99}}
    row = {"variant": "fast", "latency": {"b1": {"p50_ms": 99.0}}}
    shipped, quantised = int8_rows(row, four_way)
    assert shipped["latency"]["b1"]["p50_ms"] == 4 and shipped["latency"]["b8"]["speedup"] == 2.5
    assert shipped["vs_ort_int8"]["b1"] == 1.5 and quantised["latency"]["b8"]["p50_ms"] == 24
    assert quantised["variant"] == "fast + ORT int8" and quantised["top1"] == 88.0
