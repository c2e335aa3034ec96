"""Shared fixtures: small real models (timm architectures) and checkpoints written by the tests."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitcompress.batch.runner import THREAD_ENV
from vitcompress.deploy.runtime import CASCADE_FILE, preprocessing_metadata
from vitcompress.export import export_onnx
from vitcompress.layers.entropy import WithEntropy
from vitcompress.models import REFERENCE_CFG, build_reference_architecture


def share_the_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker process its share of the cores for torch's (OpenMP) threads and for
    the processes it starts. Left at every core each, the workers' spinning OpenMP threads slow each other down:
    tests/stages/test_finetune_scale.py's resume test took 59 s beside another worker, 4.5 s alone (2 cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        for variable in THREAD_ENV:
            os.environ.setdefault(variable, str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


share_the_cores_between_workers()

# Small budgets so a whole conversion runs in seconds on 2 CPU cores.
FAST = ["finetune.steps=3", "finetune.batch_size=8", "validate.images=64", "validate.latency_runs=3",
        "validate.warmup_runs=1", "validate.profile_runs=0", "calibration.images=32", "calibration.batch_size=16"]


def assert_onnxruntime_matches_torch(model: torch.nn.Module, onnx_path, input_size: tuple[int, ...]) -> None:
    """ORT logits within 1e-4 of torch's, and the same top-1, on a seeded batch of 4."""
    import numpy as np

    from vitcompress.deploy.runtime import open_session

    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(1))
    got = open_session(onnx_path, threads=2).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.fixture(scope="session")
def reference_model() -> torch.nn.Module:
    """The vit_fmnist architecture with seeded random weights (independent of the shipped weights)."""
    torch.manual_seed(0)
    return build_reference_architecture().eval()


@pytest.fixture(scope="session")
def test_vit() -> torch.nn.Module:
    """timm's smallest ViT (``test_vit``: 6 blocks, width 64, 160×160 images, 1000 classes), seeded random
    weights: the same classes as DeiT, for tests where DeiT's size adds nothing."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


@pytest.fixture(scope="session")
def deit_tiny() -> torch.nn.Module:
    """A DeiT architecture (deit_tiny_patch16_224), seeded random weights."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a recipe file from a YAML string; returns its path."""

    def write(text: str, name: str = "recipe.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A small real ViT on 28×28 grey images exported three ways: plain, and as a cascade's low and high model."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    directory = tmp_path_factory.mktemp("tiny")
    meta = preprocessing_metadata(REFERENCE_CFG, list(REFERENCE_CFG["label_names"]))
    export_onnx(model, directory / "model.onnx", input_size=(1, 28, 28), metadata=meta)
    for name in ("low", "high"):
        export_onnx(WithEntropy(model), directory / f"{name}.onnx", input_size=(1, 28, 28), metadata=meta,
                    output_names=("logits", "entropy"))
    (directory / CASCADE_FILE).write_text(json.dumps({"low": "low.onnx", "high": "high.onnx", "threshold": 0.5}))
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 31)) * 255).astype(np.uint8)).save(directory / f"{i}.png")
    return directory, model
