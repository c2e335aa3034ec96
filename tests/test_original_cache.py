"""The original's export and predictions are reused, through a cache the caller passes, only when the result is the same."""

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitcompress
from tests.conftest import FAST
from vitcompress import evaluate
from vitcompress.models import load_model
from vitcompress.original_cache import OriginalCache, model_digest
from vitcompress.stages import validate


def test_digest_follows_weights_and_structure(reference_model):
    same = copy.deepcopy(reference_model)
    assert model_digest(same) == model_digest(reference_model)
    with torch.no_grad():
        same.head.bias[0] += 1e-6
    assert model_digest(same) != model_digest(reference_model)

    def vit(heads: int) -> VisionTransformer:
        torch.manual_seed(0)
        return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                                 num_heads=heads)

    assert model_digest(vit(2)) != model_digest(vit(4)), \
        "same weight shapes, different attention: not the same function"


def test_random_init_is_the_same_on_every_load():
    first, second = (load_model("deit_t", random_init=True, model_args={"depth": 1}) for _ in range(2))
    assert model_digest(first.model) == model_digest(second.model)
    assert "seed 0" in first.weights


def test_a_second_conversion_reuses_the_original_and_reports_the_same(tmp_path, monkeypatch):
    calls = []
    predict = evaluate.ort_predictions
    monkeypatch.setattr(validate, "ort_predictions", lambda *a, **k: calls.append(1) or predict(*a, **k))
    cache = OriginalCache()
    reports = [vitcompress.convert("vit_fmnist", "svd", out_dir=tmp_path / str(i), data="fmnist", random_init=True,
                                   model_args={"depth": 2}, overrides=[*FAST, "finetune=null"], cache=cache).report
               for i in range(2)]
    assert len(calls) == 3, "original and converted, then the converted only"
    first, second = (r.validation.models["original"] for r in reports)
    assert first.top1 == second.top1 and first.parity == second.parity
    assert reports[0].validation.models["converted"].top1 == reports[1].validation.models["converted"].top1


def test_data_from_a_directory_or_a_dataset_is_never_reused():
    cache = OriginalCache()
    assert cache.predicted(None, lambda: 1) == (1, False)
    assert cache.predicted(None, lambda: 2) == (2, False)
    assert cache.predicted("k", lambda: 3) == (3, False)
    assert cache.predicted("k", lambda: 4) == (3, True)


def test_memory_is_bounded(tmp_path):
    cache = OriginalCache(max_onnx_bytes=10)
    for key in "abc":
        cache.exported(key, tmp_path / f"{key}.onnx", lambda path: path.write_bytes(b"12345678") and path)
    assert list(cache._onnx) == ["c"]
    (tmp_path / "again.onnx").unlink(missing_ok=True)
    with pytest.raises(ZeroDivisionError):
        cache.exported("a", tmp_path / "again.onnx", lambda path: 1 / 0)
