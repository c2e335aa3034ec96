import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitcompress.errors import ModelError
from vitcompress.models import load_model, read_state_dict, resolve_name


@pytest.fixture(scope="module")
def test_vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def _same_weights(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)


def test_aliases_and_unknown_names():
    assert resolve_name("deit_s") == "deit_small_patch16_224"
    assert resolve_name("vit_fmnist") == "vit_fmnist"
    with pytest.raises(ModelError, match="unknown model .deit_xxl.*alias.*did you mean"):
        resolve_name("deit_xxl")


def test_safetensors_checkpoint(tmp_path, test_vit):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in test_vit.state_dict().items()}, str(path))
    loaded = load_model("test_vit", checkpoint=path)
    _same_weights(loaded.model, test_vit)
    assert loaded.weights == f"checkpoint {path}"
    assert not loaded.model.training


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_pth_checkpoint_containers(tmp_path, test_vit, wrap):
    state = test_vit.state_dict()
    payload = {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    _same_weights(load_model("test_vit", checkpoint=path).model, test_vit)


def test_checkpoint_with_other_head_size(tmp_path):
    torch.manual_seed(1)
    ten_class = timm.create_model("test_vit", pretrained=False, num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(ten_class.state_dict(), path)
    loaded = load_model("test_vit", checkpoint=path)
    assert loaded.model.head.out_features == 10


def test_pth_is_read_without_unpickling_code(tmp_path, test_vit):
    path = tmp_path / "evil.pth"
    torch.save({"model": test_vit.state_dict(), "obj": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ModelError, match="cannot be read"):
        load_model("test_vit", checkpoint=path)


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, test_vit):
    with pytest.raises(ModelError, match="does not exist"):
        load_model("test_vit", checkpoint=tmp_path / "none.safetensors")
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="cannot be read"):
        load_model("test_vit", checkpoint=corrupt)
    truncated = tmp_path / "trunc.pth"
    torch.save(test_vit.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot be read"):
        load_model("test_vit", checkpoint=truncated)
    foreign = tmp_path / "deit.pth"
    torch.save(timm.create_model("test_vit2").state_dict(), foreign)
    with pytest.raises(ModelError, match="is for another architecture: .*unexpected keys"):
        load_model("test_vit", checkpoint=foreign)
    no_tensors = tmp_path / "cfg.pth"
    torch.save({"lr": 0.1}, no_tensors)
    with pytest.raises(ModelError, match="no state dict of tensors"):
        read_state_dict(no_tensors)


def test_offline_download_is_an_error_not_random_weights(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="--checkpoint PATH .* --random-init"):
        load_model("test_vit")


def test_random_init_is_stated():
    loaded = load_model("test_vit", random_init=True)
    assert loaded.weights.startswith("random init")
    with pytest.raises(ModelError, match="exclude each other"):
        load_model("test_vit", checkpoint="x.pth", random_init=True)


def test_196_token_reference_model_has_a_vit224_token_count(monkeypatch, tmp_path):
    import vitcompress.models as models

    assert resolve_name("vit_fmnist196") == "vit_fmnist196"
    loaded = load_model("vit_fmnist196", random_init=True)
    assert loaded.model.patch_embed.num_patches == 196 and loaded.data_config["input_size"] == (1, 28, 28)
    assert loaded.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    monkeypatch.setattr(models, "reference_weights_path", lambda name: tmp_path / f"{name}.safetensors")
    with pytest.raises(ModelError, match="embedded weights .* missing: run examples/train_reference.py --model vit_fmnist196"):
        load_model("vit_fmnist196")


def test_196_token_reference_model_ships_trained_weights():
    from vitcompress.data import FMNIST_MEAN, FMNIST_STD, load_fmnist_arrays, normalize_uint8

    loaded = load_model("vit_fmnist196")
    assert loaded.weights == "embedded (vit_fmnist196.safetensors)"
    images, labels = (t[:128] for t in load_fmnist_arrays("test"))
    with torch.no_grad():
        predictions = loaded.model(normalize_uint8(images, FMNIST_MEAN, FMNIST_STD)).argmax(-1)
    assert (predictions == labels).float().mean().item() >= 0.88


def test_reference_model_config(tmp_path, reference_model):
    path = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model.state_dict().items()}, str(path))
    loaded = load_model("vit_fmnist", checkpoint=path)
    assert loaded.data_config["input_size"] == (1, 28, 28)
    assert loaded.data_config["mean"] == (0.2860,) and len(loaded.class_names) == 10
    _same_weights(loaded.model, reference_model)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and an endpoint that refuses connections (port 9 on this machine): offline,
    whether or not the machine running the tests has a network."""
    import huggingface_hub.constants

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_without_cache_fails_fast(no_hub):
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"not cached and 127\.0\.0\.1 cannot be reached .*--checkpoint PATH"):
        load_model("deit_s")
    assert time.perf_counter() - start < 10


def test_cached_hub_weights_load_offline(no_hub, test_vit):
    """Weights in the HF cache are used without the network (timm's own repo id, safetensors file)."""
    repo = no_hub / f"models--{test_vit.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in test_vit.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded = load_model("test_vit")
    assert loaded.weights == "timm pretrained (test_vit)"
    _same_weights(loaded.model, test_vit)
