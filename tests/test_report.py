"""The report schema: the stages' dict validates into ``Report`` (unknown keys and wrong types fail), report.json
loads back equal, and report.md renders from the model's attributes."""

import copy
import json

import pytest
from pydantic import ValidationError

from vitcompress.render import markdown, side_by_side_rows
from vitcompress.report import SCHEMA_VERSION, Report, Sections, build


def latency(p50: float) -> dict:
    return {"b1": {"p50_ms": p50, "p90_ms": p50 * 1.1, "mean_ms": p50, "spread": 0.1, "runs": 3}}


def metrics(params: int, p50: float, top1: float, agreement: float) -> dict:
    return {"params": params, "macs": params * 50, "top1": top1, "latency": latency(p50), "agreement": agreement,
            "parity": {"max_abs_diff": 2e-6, "top1_agreement": 1.0, "images": 64}}


def stage_sections() -> dict:
    """What the stages leave in ``ctx.report`` for a CKA skip run with a failing and a skipped gate."""
    cka = {"blocks.1": 0.9, "blocks.2": 0.5}
    return {
        "recipe": "recipes/skip_cka.yaml", "date": "2026-12-01T10:00:00+00:00", "machine": "test CPU, 2 threads",
        "versions": {"torch": "2.5"},
        "model": {"name": "vit_fmnist", "weights": "in-memory module", "input_size": [1, 28, 28], "source": "argument"},
        "data": {"name": "fmnist", "train_images": 100, "val_images": 64, "labelled": True},
        "steps": [{"step": 0, "transform": "attention_skip", "modules": ["blocks.1"], "params_before": 1000,
                   "params_after": 900, "details": {"select": "cka", "skipped": ["blocks.1"],
                                                    "rounds": [{"chosen": "blocks.1", "cka": cka}]}}],
        "finetune": {"steps_done": 3, "steps_budget": 3, "first_loss": 1.5, "last_loss": 1.25, "seconds": 2.0,
                     "images_per_second": 12.0, "stopped": None, "device": "cpu"},
        "export": {"opset": 20, "dynamic_batch": True, "checked_batches": [1, 3], "onnx_bytes": 4096},
        "validation": {"images": 64, "threads": 2,
                       "models": {"original": metrics(1000, 2.0, 88.0, 1.0), "converted": metrics(900, 1.6, 80.0, 0.9)},
                       "gates": [{"gate": "max_abs_diff", "limit": 1e-3, "value": 2e-6, "passed": True},
                                 {"gate": "max_top1_drop", "limit": 1.0, "value": 8.0, "passed": False},
                                 {"gate": "min_agreement", "limit": 0.5, "value": None, "passed": None,
                                  "note": "skipped: no labels"}]},
    }


def built(sections: dict) -> Report:
    """The report of ``sections`` as the stages would assign them (each section validated), then built."""
    return build(Sections.model_validate(sections))


def test_build_validates_the_sections_and_lists_the_failed_gates():
    report = built(stage_sections())
    assert report.schema_version == SCHEMA_VERSION and report.failed_gates == ["max_top1_drop"]
    assert report.validation.models["converted"].latency[1].p50_ms == 1.6
    assert report.cascade is None and report.profile is None and report.export.moe_dispatch is None


def test_report_json_loads_back_equal(tmp_path):
    report = built(stage_sections())
    (tmp_path / "report.json").write_text(report.dump_json())
    assert Report.load(tmp_path / "report.json") == report == Report.load(tmp_path)
    assert json.loads(report.dump_json())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("path", [(), ("validation", "models", "converted"), ("steps", 0), ("finetune",)])
def test_an_unknown_key_anywhere_is_an_error(path):
    sections = stage_sections()
    node = sections
    for key in path:
        node = node[key]
    node["colour"] = "red"
    with pytest.raises(ValidationError, match="colour\n.*Extra inputs are not permitted"):
        built(sections)


def test_a_wrong_type_or_a_missing_section_is_an_error():
    sections = stage_sections()
    sections["validation"]["models"]["converted"]["params"] = "many"
    with pytest.raises(ValidationError, match="validation.models.converted.params"):
        built(sections)
    sections = stage_sections()
    del sections["export"]
    with pytest.raises(ValidationError, match="export\n.*Field required"):
        built(sections)


def test_another_schema_version_does_not_load(tmp_path):
    data = json.loads(built(stage_sections()).dump_json())
    (tmp_path / "report.json").write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(ValidationError, match="schema_version"):
        Report.load(tmp_path)


def test_markdown_renders_the_table_the_cka_scores_and_every_gate():
    report = built(stage_sections())
    text = markdown(report)
    assert "# vitcompress report: vit_fmnist" in text and "- weights: in-memory module" in text
    assert "| ORT latency b1 p50 / p90 | 2.00 / 2.20 ms | 1.60 / 1.76 ms (1.25×) |" in text
    assert "| blocks.1 | 0.9000 | 1 |" in text and "| blocks.2 | 0.5000 | — |" in text
    assert "| max_top1_drop | 1.0 | 8 | **FAIL** |" in text
    assert "| min_agreement | 0.5 | — | skipped: no labels |" in text
    assert "fine-tune: 3/3 steps, loss 1.5000 → 1.2500" in text


def test_no_top1_row_without_labels():
    sections = copy.deepcopy(stage_sections())
    for model in sections["validation"]["models"].values():
        model["top1"] = None
    assert not any(row[0].startswith("top-1 (%)") for row in side_by_side_rows(built(sections)))


def test_markdown_of_a_finetune_stopped_before_its_first_step():
    """A non-finite loss at step 0: no loss to show, the reason instead (this crashed report.md once)."""
    sections = copy.deepcopy(stage_sections())
    sections["finetune"].update(steps_done=0, first_loss=None, last_loss=None,
                                stopped="non-finite loss or gradient at step 0: stopped, kept the weights from before the fine-tune")
    text = markdown(built(sections))
    assert "fine-tune: 0/3 steps, 12 img/s" in text and "non-finite loss or gradient at step 0" in text


def test_timings_round_trip_and_render_one_line(tmp_path):
    sections = stage_sections()
    sections["steps"][0].update(seconds=3.0, calibration_seconds=2.5)
    sections["timings"] = {"seconds": 10.0, "stages": [
        {"stage": "load", "seconds": 1.0},
        {"stage": "transform", "seconds": 3.5, "parts": [{"name": "step 0 attention_skip", "seconds": 3.0},
                                                         {"name": "ladder (transformed, torch)", "seconds": 0.01}]},
        {"stage": "validate", "seconds": 5.0, "parts": [{"name": "latency", "seconds": 4.0}]}]}
    report = built(sections)
    (tmp_path / "report.json").write_text(report.dump_json())
    assert Report.load(tmp_path) == report and report.timings.stages[1].parts[0].seconds == 3.0
    assert ("- wall time (seconds per stage): 10.0 s: load 1.0, transform 3.5 (step 0 attention_skip 3.0, "
            "calibration 2.5), validate 5.0 (latency 4.0)") in markdown(report)


def test_a_report_without_timings_loads_and_renders():
    report = built(stage_sections())
    assert report.timings is None and report.steps[0].seconds is None
    assert "wall time" not in markdown(report)


def test_the_stage_clock_times_stages_and_their_parts(monkeypatch):
    from vitcompress import context

    now = iter([0.0, 1.0, 1.5, 2.0, 4.0, 5.0, 6.0, 7.0])
    monkeypatch.setattr(context.time, "perf_counter", lambda: next(now))
    clock = context.StageClock()  # starts at 0
    with clock.stage("export"):  # 1 → 4
        with clock.part("original"):  # 1.5 → 2
            pass
        clock.add_part("converted", 1.25)
    with clock.stage("page"):  # 5 → 6
        pass
    timings = clock.timings()  # at 7
    assert timings.seconds == 7.0 and [(s.stage, s.seconds) for s in timings.stages] == [("export", 3.0),
                                                                                       ("page", 1.0)]
    assert [(p.name, p.seconds) for p in timings.stages[0].parts] == [("original", 0.5), ("converted", 1.25)]
    assert timings.stages[1].parts == []
