"""int8 export (``export.quantize``, :mod:`vitcompress.quantize`): the graph onnxruntime's quantiser makes, its
accuracy on the reference model, and a whole conversion whose bundle ships and verifies the int8 model."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from click.testing import CliRunner

from tests.conftest import FAST
from vitcompress.api import apply
from vitcompress.cli import main
from vitcompress.data import first_images, fmnist_dataset
from vitcompress.deploy.bundle import verify
from vitcompress.deploy.runtime import open_session, preprocessing_metadata
from vitcompress.errors import ExportError
from vitcompress.evaluate import ort_predictions, top1
from vitcompress.export import export_onnx
from vitcompress.layers.int8_linear import Int8PotLinear
from vitcompress.models import REFERENCE_CFG, load_model
from vitcompress.quantize import quantize_onnx
from vitcompress.transforms.lowrank import LowRankConfig

INPUT = (1, 28, 28)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()


def batches(count: int = 2, size: int = 8):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((size, *INPUT), dtype=np.float32) for _ in range(count)]


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor name of ``graph`` → the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """The tiny ViT with block 0's fc1 factored at rank 4, exported in float32 with the preprocessing metadata."""
    model = apply(tiny_vit(), LowRankConfig(targets=["blocks.0.mlp.fc1"], rank=4))
    path = tmp_path_factory.mktemp("quant") / "lowrank.onnx"
    meta = preprocessing_metadata(REFERENCE_CFG, list(REFERENCE_CFG["label_names"]))
    return export_onnx(model, path, input_size=INPUT, metadata=meta), model


def test_static_is_qdq_without_dynamic_quantization(lowrank, tmp_path):
    import logging

    path, _ = lowrank
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        done = quantize_onnx(path, tmp_path / "int8.onnx", "static", calibration=batches())
        assert root.level == logging.INFO, "the caller's root logger level is restored"
    finally:
        root.setLevel(before)
    found = ops(tmp_path / "int8.onnx")
    assert found["DynamicQuantizeLinear"] == 0 and found["MatMulInteger"] == 0
    assert found["QuantizeLinear"] > 0 and found["DequantizeLinear"] > 0
    assert done["calibration_images"] == 16 and done["calibration"] == "minmax"
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}
    assert meta == {p.key: p.value for p in onnx.load(str(path)).metadata_props} and meta


@pytest.mark.slow
def test_calibration_runs_a_few_images_at_a_time_with_the_same_ranges(lowrank, tmp_path, monkeypatch):
    """Calibration feeds onnxruntime CALIBRATION_CHUNK images per run (a whole batch of DeiT-S activations took
    14 GB); the minmax ranges, so every scale and zero point, equal those of whole-batch runs."""
    from vitcompress import quantize

    reader = quantize.BatchReader(batches(count=2, size=20), chunk=8)
    sizes = [len(reader.get_next()["input"]) for _ in range(6)]
    assert sizes == [8, 8, 4, 8, 8, 4] and reader.get_next() is None and reader.images == 40
    path, _ = lowrank
    scales = {}
    for chunk in (3, 64):
        monkeypatch.setattr(quantize, "CALIBRATION_CHUNK", chunk)
        quantize_onnx(path, tmp_path / f"int8_{chunk}.onnx", "static", calibration=batches(size=20))
        scales[chunk] = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"int8_{chunk}.onnx"))
                         .graph.initializer if t.name.endswith(("_scale", "_zero_point"))}
    assert scales[3].keys() == scales[64].keys() and scales[3]
    for name, value in scales[3].items():
        np.testing.assert_array_equal(value, scales[64][name], err_msg=name)


def test_lowrank_pair_shares_one_quantize_step_on_the_intermediate(lowrank, tmp_path):
    """Exactly one pair of weight layers (MatMul or Gemm: the rank-4 factors) feeding one another; the rank-r
    tensor between them goes through one QuantizeLinear → one DequantizeLinear → the second factor, and nowhere
    else."""
    path, _ = lowrank
    quantize_onnx(path, tmp_path / "int8.onnx", "static", calibration=batches())
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers = consumers_of(graph)

    def dequantized_weight(node) -> bool:
        source = producer.get(node.input[1])
        return source is not None and source.op_type == "DequantizeLinear" and source.input[0] not in producer

    pairs = []
    for second in graph.node:
        if second.op_type not in ("MatMul", "Gemm") or not dequantized_weight(second):
            continue
        dq = producer.get(second.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        first = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if first is not None and first.op_type in ("MatMul", "Gemm") and dequantized_weight(first):
            pairs.append((first, q, dq, second))
    assert len(pairs) == 1, [p[3].name for p in pairs]
    first, q, dq, second = pairs[0]
    rank = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == producer[first.input[1]].input[0]))
    assert rank.shape[-1] == 4 or rank.shape[0] == 4
    assert [n.op_type for n in consumers[first.output[0]]] == ["QuantizeLinear"]
    assert [n.op_type for n in consumers[q.output[0]]] == ["DequantizeLinear"]
    assert consumers[dq.output[0]] == [second]


def test_static_leaves_layer_outputs_float_so_onnxruntime_fuses_every_layer(lowrank, tmp_path):
    """A quantised layer's output is float32 (no QuantizeLinear after it, except into the second factor of a
    low-rank pair; ``quantised_outputs`` puts them back), so onnxruntime's optimised graph has every weight layer
    fused into QGemm / MatMulIntegerToFloat and no DequantizeLinear before GELU or the residual Add."""
    path, _ = lowrank

    def layers_with_quantised_output(target, **options) -> list[str]:
        quantize_onnx(path, target, "static", calibration=batches(), **options)
        graph = onnx.load(str(target)).graph
        consumers = consumers_of(graph)
        return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
                and [c.op_type for c in consumers.get(n.output[0], [])] == ["QuantizeLinear"]]

    assert len(layers_with_quantised_output(tmp_path / "int8.onnx")) == 1  # the pair's first factor, into the second
    assert len(layers_with_quantised_output(tmp_path / "qdq_outputs.onnx", quantised_outputs=True)) > 1
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx")).graph
    found = Counter(n.op_type for n in optimised.node)
    float_products = found["MatMul"] + found["FusedMatMul"] + found["Gemm"]
    assert float_products == 2 * 2  # the attention products of two activations (q·kᵀ fused with its transpose)
    assert found["QGemm"] > 0 and found["MatMulIntegerToFloat"] > 0
    dequantized = {n.output[0] for n in optimised.node if n.op_type == "DequantizeLinear"}
    after_dequantize = {n.op_type for n in optimised.node if dequantized.intersection(n.input)}
    assert after_dequantize <= {"Concat", "Shape"}  # only the patch embedding's (QLinearConv) output


def test_static_is_close_to_float32_and_independent_of_the_batch(lowrank, tmp_path):
    path, model = lowrank
    quantize_onnx(path, tmp_path / "int8.onnx", "static", calibration=batches(4, 16))
    x = batches(1, 16)[0]
    session = open_session(tmp_path / "int8.onnx", threads=1)
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.1 * scale, (np.abs(got - want).max(), scale)
    alone = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(alone, got, atol=1e-5)


def test_dynamic_quantizes_at_run_time(lowrank, tmp_path):
    path, model = lowrank
    done = quantize_onnx(path, tmp_path / "dyn.onnx", "dynamic")
    found = ops(tmp_path / "dyn.onnx")
    assert found["DynamicQuantizeLinear"] > 0 and found["MatMulInteger"] > 0 and found["QuantizeLinear"] == 0
    assert done["mode"] == "dynamic" and "calibration" not in done
    x = batches(1, 4)[0]
    got = open_session(tmp_path / "dyn.onnx", threads=1).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_existing_int8_layers_are_left_alone(tmp_path):
    """A recipe's own int8 layer (DynamicQuantizeLinear + MatMulInteger) keeps its nodes under static."""
    model = tiny_vit()
    fc = model.blocks[0].mlp.fc2
    w_int = torch.randint(-64, 65, fc.weight.shape, generator=torch.Generator().manual_seed(0)).to(torch.int8)
    model.blocks[0].mlp.fc2 = Int8PotLinear(w_int, torch.full((fc.out_features,), 2.0 ** -8), fc.bias)
    path = export_onnx(model, tmp_path / "pot.onnx", input_size=INPUT)
    before = ops(path)
    assert before["MatMulInteger"] == 1 and before["DynamicQuantizeLinear"] == 1
    quantize_onnx(path, tmp_path / "int8.onnx", "static", calibration=batches())
    after = ops(tmp_path / "int8.onnx")
    assert after["MatMulInteger"] == 1 and after["DynamicQuantizeLinear"] == 1
    assert after["QuantizeLinear"] > 0


def test_static_without_calibration_images_is_an_export_error(lowrank, tmp_path):
    path, _ = lowrank
    with pytest.raises(ExportError, match="calibration images"):
        quantize_onnx(path, tmp_path / "int8.onnx", "static", calibration=[])
    assert not (tmp_path / "int8.onnx").exists()


#: The accuracy gate of static int8 on the reference model (measured: −0.1 points, 99.2 % agreement on 2,000
#: Fashion-MNIST test images; the gate leaves room for the 1,000-image sample).
MAX_TOP1_DROP, MIN_AGREEMENT = 1.0, 0.97


@pytest.mark.slow
def test_static_int8_of_the_reference_model_keeps_its_accuracy(tmp_path):
    loaded = load_model("vit_fmnist")
    fp32 = export_onnx(loaded.model, tmp_path / "fp32.onnx", input_size=INPUT)
    train, test = fmnist_dataset("train", 128), fmnist_dataset("test", 1000)
    quantize_onnx(fp32, tmp_path / "int8.onnx", "static",
                  calibration=(b.numpy() for b in first_images(train, 128, 64)))
    want = ort_predictions(open_session(fp32, 2), test)
    got = ort_predictions(open_session(tmp_path / "int8.onnx", 2), test)
    drop = top1(want.classes, want.labels) - top1(got.classes, got.labels)
    assert drop <= MAX_TOP1_DROP and (got.classes == want.classes).mean() >= MIN_AGREEMENT


@pytest.mark.slow
def test_convert_with_static_int8_ships_and_verifies_the_int8_model(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: [{transform: svd_lowrank, targets: ['blocks.*.mlp.fc1'], rank: 16}]\n"
                      "export: {quantize: static}\nvalidate: {max_abs_diff: 10.0}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "vit_fmnist", "--random-init", "--model-arg", "depth=2",
                                       "--data", "fmnist", "--recipe", str(recipe), "--out", str(out),
                                       *[x for s in FAST for x in ("--set", s)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ops(out / "model.onnx")["QuantizeLinear"] > 0 and not list(out.rglob("*fp32*"))
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["quantize"]["mode"] == "static"
    assert report["validation"]["models"]["converted"]["parity"]["onnx"] == "int8 static"
    assert "int8 static" in (out / "report.md").read_text()
    assert verify(out).ok


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize(("targets", "batched_per_block"), [("qkv", 3), ("(qkv|proj)", 0)],
                         ids=["head_major", "absorbed"])
def test_head_major_attention_quantizes_and_runs(tmp_path, mode, targets, batched_per_block):
    """A low-rank qkv with a dense proj exports per-head (3-D) q, k, v weights (HeadMajorAttention): int8
    leaves those MatMuls in float32 (dynamic: onnxruntime rejects their per-channel zero points at run time;
    static: they would not fuse into QLinearMatMul) and quantises the 2-D factors. With proj low-rank too,
    AbsorbedAttention keeps every head's matrices side by side in 2-D layers, all quantised. Both run and stay
    close to float32."""
    from vitcompress.quantize import batched_weight_nodes

    model = apply(tiny_vit(), LowRankConfig(targets=[f"re:blocks\\.\\d+\\.attn\\.{targets}"], rank=8))
    path = export_onnx(model, tmp_path / "attn.onnx", input_size=INPUT)
    batched = batched_weight_nodes(onnx.load(str(path)))
    assert len(batched) == 2 * batched_per_block
    quantize_onnx(path, tmp_path / "int8.onnx", mode, calibration=batches())
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    float_layers = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in float_weights]
    assert len(float_layers) == len(batched)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear") for n in graph.node)
    x = batches(1, 16)[0]
    got = open_session(tmp_path / "int8.onnx", threads=1).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
