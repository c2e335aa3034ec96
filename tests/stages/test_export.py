import json

import numpy as np
import onnx
import pytest
import torch

from vitcompress.data import FMNIST_CLASSES
from vitcompress.deploy.runtime import open_session, preprocessing_metadata
from vitcompress.errors import ExportError
from vitcompress.evaluate import latency
from vitcompress.export import check_runs, export_onnx
from vitcompress.export_config import ExportConfig
from vitcompress.recipe import ValidateConfig
from vitcompress.report import ModelMetrics, Parity
from vitcompress.stages.validate import gates

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference_model):
    path = tmp_path_factory.mktemp("export") / "ref.onnx"
    meta = preprocessing_metadata(dict(reference_model.pretrained_cfg), list(FMNIST_CLASSES))
    return export_onnx(reference_model, path, config=ExportConfig(opset=18), metadata=meta)


def test_graph_is_valid_with_layernorm_op_and_metadata(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops, "opset ≥ 17 must keep LayerNorm as one op (fp16 safety)"
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["vitcompress.input_size"]) == [1, 28, 28]
    assert json.loads(meta["vitcompress.std"]) == [0.353]
    assert json.loads(meta["vitcompress.class_names"])[9] == "ankle boot"


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_matches_torch(exported, reference_model, batch):
    x = torch.randn(batch, 1, 28, 28)
    got = open_session(exported, threads=1).run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = reference_model(x).numpy()
    assert got.shape == (batch, 10) and np.abs(got - want).max() < 1e-4


def test_static_batch_export_is_detected(tmp_path, reference_model):
    path = export_onnx(reference_model, tmp_path / "static.onnx", config=ExportConfig(dynamic_batch=False))
    with pytest.raises(ExportError, match="does not run at batch 1"):
        check_runs(path, (1, 28, 28), (1,))


def test_latency_is_measured_interleaved_for_each_batch(exported):
    config = ValidateConfig(batch_sizes=[1, 2], latency_runs=4, warmup_runs=1, threads=1)
    result = latency({"a": exported, "b": exported}, config)
    for name in ("a", "b"):
        assert set(result[name]) == {1, 2}
        assert result[name][1]["runs"] == 4
        assert 0 < result[name][1]["p50_ms"] <= result[name][1]["p90_ms"]


def metrics(top1: float | None, agreement: float = 1.0, max_abs_diff: float = 0.0,
            onnx: str = "float32") -> ModelMetrics:
    """The fields of a model's metrics that the gates read (the rest left unset)."""
    return ModelMetrics.model_construct(top1=top1, agreement=agreement,
                                        parity=Parity.model_construct(max_abs_diff=max_abs_diff, onnx=onnx))


def test_gates():
    table = {"original": metrics(90.0), "converted": metrics(88.5, 0.96, 2e-5)}
    result = {g.gate: g.passed for g in gates(table, ValidateConfig(max_top1_drop=1.0, min_agreement=0.95))}
    assert result == {"max_abs_diff": True, "max_top1_drop": False, "min_agreement": True}
    table["original"] = metrics(None)
    skipped = gates(table, ValidateConfig(max_top1_drop=1.0))
    assert skipped[1].passed is None and "no labels" in skipped[1].note


def test_parity_gate_of_an_int8_model_says_what_it_compares():
    table = {"original": metrics(90.0), "converted": metrics(89.9, 0.99, 0.2, "int8 static")}
    gate = gates(table, ValidateConfig(max_abs_diff=0.5))[0]
    assert gate.passed and gate.note == "torch float32 vs the int8 static ONNX model"
    table["converted"] = metrics(89.9, 0.99, 0.2)
    assert gates(table, ValidateConfig())[0].note is None
