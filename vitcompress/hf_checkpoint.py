"""Hugging Face checkpoints: a ``transformers`` ``save_pretrained`` directory of a ViT, DeiT or DINOv2 classifier
as the equivalent timm model, its weights mapped key by key.

Read without ``transformers``: ``config.json`` gives the architecture (:class:`HfConfig`), ``model.safetensors``
(or its shards, or ``pytorch_model.bin``) the weights, ``preprocessor_config.json`` the preprocessing (else the
defaults of the architecture's image processor) and ``id2label`` the class names. The mapping is exact (the test
compares logits with transformers' own forward): separate q/k/v → timm's fused ``qkv``, layer norms, layer scale,
class / distillation / register tokens and each family's head. A directory that cannot be mapped is one
:class:`~vitcompress.errors.ModelError` naming what is not supported; weights never fall back to random.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.errors import ModelError

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: PIL's resampling numbers (``resample`` in an image processor's config) as timm's interpolation names.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: transformers' ``hidden_act`` names as timm's activation names.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
#: HF layer key suffix → timm block key suffix, per family layout (q/k/v are fused separately).
LAYER_KEYS = {
    "vit": {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
    "dinov2": {"attention.output.dense": "attn.proj", "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"},
}


@dataclass(frozen=True)
class Family:
    """How one ``transformers`` classifier class maps onto timm: its state-dict prefix, layer layout and head."""

    prefix: str
    layout: str  # a key of LAYER_KEYS
    head: str  # "token": Linear on the class token; "distilled": mean of class- and distillation-token heads;
    #            "token_mean": Linear on [class token, mean of patch tokens] (DINOv2)
    extra_token: str | None = None  # HF name of a second prefix token: "distillation_token" or "register_tokens"
    defaults: tuple[tuple[str, Any], ...] = ()  # config values of the transformers class, for keys a file omits
    preprocessing: tuple[tuple[str, Any], ...] = ()  # the class's default image processor settings


VIT_DEFAULTS = (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
                ("intermediate_size", 3072), ("hidden_act", "gelu"), ("layer_norm_eps", 1e-12), ("image_size", 224),
                ("patch_size", 16), ("num_channels", 3), ("qkv_bias", True))
DINOV2_DEFAULTS = (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12), ("mlp_ratio", 4),
                   ("hidden_act", "gelu"), ("layer_norm_eps", 1e-6), ("image_size", 224), ("patch_size", 14),
                   ("num_channels", 3), ("qkv_bias", True), ("use_swiglu_ffn", False),
                   ("num_register_tokens", 0))
IMAGENET_CROP = (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD), ("resample", 3),
                 ("do_center_crop", True), ("crop_size", {"height": 224, "width": 224}))
FAMILIES: dict[str, Family] = {
    "ViTForImageClassification": Family(
        "vit", "vit", "token", defaults=VIT_DEFAULTS,
        preprocessing=(("image_mean", (0.5,) * 3), ("image_std", (0.5,) * 3), ("resample", 2),
                       ("size", {"height": 224, "width": 224}))),
    "DeiTForImageClassification": Family(
        "deit", "vit", "token", "distillation_token", VIT_DEFAULTS,
        IMAGENET_CROP + (("size", {"height": 256, "width": 256}),)),
    "DeiTForImageClassificationWithTeacher": Family(
        "deit", "vit", "distilled", "distillation_token", VIT_DEFAULTS,
        IMAGENET_CROP + (("size", {"height": 256, "width": 256}),)),
    "Dinov2ForImageClassification": Family(
        "dinov2", "dinov2", "token_mean", None, DINOV2_DEFAULTS,
        IMAGENET_CROP + (("size", {"shortest_edge": 256}),)),
    "Dinov2WithRegistersForImageClassification": Family(
        "dinov2_with_registers", "dinov2", "token_mean", "register_tokens", DINOV2_DEFAULTS,
        IMAGENET_CROP + (("size", {"shortest_edge": 256}),)),
}


@dataclass(frozen=True)
class HfConfig:
    """The architecture ``config.json`` describes, in the terms timm's ``VisionTransformer`` takes."""

    architecture: str
    family: Family
    hidden_size: int
    depth: int
    heads: int
    mlp_hidden: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    channels: int
    qkv_bias: bool
    eps: float
    act: str
    layer_scale: bool  # DINOv2's per-channel scale on each residual branch (timm's ls1/ls2)
    register_tokens: int
    class_names: list[str] | None


@dataclass(frozen=True)
class HfModel:
    """A Hugging Face checkpoint loaded as a timm model (eval mode, ``pretrained_cfg`` set from its
    preprocessing and class names) and a sentence saying where its weights came from."""

    model: nn.Module
    weights: str


def is_hf_directory(name: str) -> bool:
    """Whether a MODEL argument names a Hugging Face checkpoint directory (one holding ``config.json``)."""
    return Path(name).is_dir() and (Path(name) / CONFIG).is_file()


def load_hf_directory(path: Path) -> HfModel:
    """Build the timm equivalent of the checkpoint in ``path`` and load its weights (strictly: every tensor of
    the model from the file, every tensor of the file used or known to be unused at inference)."""
    config = read_config(path)
    weights = _weights_file(path)
    state = _read_weights(weights)
    preprocessing = _read_json(path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else dict(
        config.family.preprocessing)
    input_hw = _input_size(config, preprocessing)
    with torch.random.fork_rng(devices=[]):  # timm's init (overwritten below) leaves the caller's RNG alone
        model = build_timm_model(config, input_hw, num_classes=_classes(config, state, path))
    _load_strict(model, map_state_dict(config, state, input_hw), path)
    model.pretrained_cfg = _data_config(preprocessing, config, input_hw, int(model.num_classes))
    model.eval()
    return HfModel(model, f"Hugging Face checkpoint {weights} ({config.architecture} → timm "
                          f"{type(model).__name__})")


def read_config(path: Path) -> HfConfig:
    """``config.json`` as an :class:`HfConfig`; a :class:`ModelError` naming an architecture or a feature
    (SwiGLU MLP, an unknown activation) that has no mapping."""
    raw = _read_json(path / CONFIG)
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in FAMILIES:
        found = architecture or f"model_type {raw.get('model_type', 'unknown')!r} without `architectures`"
        raise ModelError(f"{path} is a Hugging Face checkpoint of {found}, which vitcompress cannot map to timm: "
                         f"supported are {', '.join(FAMILIES)}")
    family = FAMILIES[architecture]
    cfg = {**dict(family.defaults), **raw}
    if cfg.get("use_swiglu_ffn"):
        raise ModelError(f"{path}: {architecture} with use_swiglu_ffn (a SwiGLU MLP) has no timm mapping here")
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ModelError(f"{path}: hidden_act {cfg['hidden_act']!r} has no timm equivalent here "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    hidden = int(cfg["hidden_size"])
    mlp_hidden = int(cfg["intermediate_size"]) if family.layout == "vit" else int(hidden * cfg["mlp_ratio"])
    labels = cfg.get("id2label") or {}
    return HfConfig(architecture=architecture, family=family, hidden_size=hidden, depth=int(cfg["num_hidden_layers"]),
                    heads=int(cfg["num_attention_heads"]), mlp_hidden=mlp_hidden,
                    image_size=_pair(cfg["image_size"]), patch_size=_pair(cfg["patch_size"]),
                    channels=int(cfg["num_channels"]), qkv_bias=bool(cfg["qkv_bias"]),
                    eps=float(cfg["layer_norm_eps"]), act=ACTIVATIONS[cfg["hidden_act"]],
                    layer_scale=family.layout == "dinov2",
                    register_tokens=int(cfg.get("num_register_tokens") or 0),
                    class_names=[labels[k] for k in sorted(labels, key=int)] if labels else None)


class ClassAndMeanPool(nn.Module):
    """DINOv2's classifier input: the class token next to the mean of the patch tokens (prefix tokens — class
    and registers — excluded). Sits in timm's ``attn_pool`` slot, which receives every token."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=1)


def build_timm_model(config: HfConfig, input_hw: tuple[int, int], num_classes: int) -> nn.Module:
    """The timm module computing what ``config``'s transformers class computes, without weights."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    mlp_ratio = config.mlp_hidden / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.mlp_hidden:  # timm takes a ratio: make it round back exactly
        mlp_ratio = (config.mlp_hidden + 0.5) / config.hidden_size
    family = config.family
    kwargs: dict[str, Any] = dict(
        img_size=input_hw, patch_size=config.patch_size, in_chans=config.channels, num_classes=num_classes,
        embed_dim=config.hidden_size, depth=config.depth, num_heads=config.heads, mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias, norm_layer=functools.partial(nn.LayerNorm, eps=config.eps), act_layer=config.act,
        init_values=1.0 if config.layer_scale else None, global_pool="token")  # the scale's values: loaded
    if family.head == "distilled":
        return VisionTransformerDistilled(**kwargs)
    if family.extra_token == "distillation_token":  # DeiT's token rides along unread: timm's one register token
        return VisionTransformer(reg_tokens=1, **kwargs)
    # DINOv2 with registers adds no position embedding to them (timm: no_embed_class; the class token's goes
    # into the token itself in map_state_dict)
    model = VisionTransformer(reg_tokens=config.register_tokens, no_embed_class=config.register_tokens > 0, **kwargs)
    if family.head == "token_mean":
        model.attn_pool = ClassAndMeanPool(model.num_prefix_tokens)
        model.pool_include_prefix = True
        model.head = nn.Linear(2 * config.hidden_size, num_classes)
    return model


def map_state_dict(config: HfConfig, state: dict[str, torch.Tensor],
                   input_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under timm's names: q/k/v fused into ``qkv``, the position embedding resampled
    when the input size differs from the config's (as transformers interpolates DINOv2's at run time).
    Keys that transformers does not use for classification (mask token, pooler) are dropped; any other key
    left unmapped is a :class:`ModelError`."""
    family, p = config.family, config.family.prefix
    state = {k: v for k, v in state.items() if not k.startswith(f"{p}.pooler.") and k != f"{p}.embeddings.mask_token"}
    out: dict[str, torch.Tensor] = {}

    def take(hf: str, timm_key: str) -> None:
        if hf in state:
            out[timm_key] = state.pop(hf)

    emb = f"{p}.embeddings"
    take(f"{emb}.patch_embeddings.projection.weight", "patch_embed.proj.weight")
    take(f"{emb}.patch_embeddings.projection.bias", "patch_embed.proj.bias")
    take(f"{emb}.cls_token", "cls_token")
    take(f"{emb}.position_embeddings", "pos_embed")
    if family.extra_token is not None:
        take(f"{emb}.{family.extra_token}", "dist_token" if family.head == "distilled" else "reg_token")
    take(f"{p}.layernorm.weight", "norm.weight")
    take(f"{p}.layernorm.bias", "norm.bias")
    heads = {"classifier": "head"} if family.head != "distilled" else {
        "cls_classifier": "head", "distillation_classifier": "head_dist"}
    for hf, timm_key in heads.items():
        take(f"{hf}.weight", f"{timm_key}.weight")
        take(f"{hf}.bias", f"{timm_key}.bias")
    for i in range(config.depth):
        layer, block = f"{p}.encoder.layer.{i}", f"blocks.{i}"
        for hf, timm_key in LAYER_KEYS[family.layout].items():
            take(f"{layer}.{hf}.weight", f"{block}.{timm_key}.weight")
            take(f"{layer}.{hf}.bias", f"{block}.{timm_key}.bias")
            take(f"{layer}.{hf}", f"{block}.{timm_key}")  # layer scale: a bare parameter
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{layer}.attention.attention.{n}.{part}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[f"{block}.attn.qkv.{part}"] = torch.cat(qkv, dim=0)
    if state:
        raise ModelError(f"{len(state)} tensors of the checkpoint have no place in {config.architecture} "
                         f"(e.g. {min(state)}): is config.json the one saved with these weights?")
    if config.register_tokens and "pos_embed" in out and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if "pos_embed" in out and input_hw != config.image_size:
        out["pos_embed"] = _resample_pos_embed(out["pos_embed"], config, input_hw)
    return out


def _resample_pos_embed(pos: torch.Tensor, config: HfConfig, input_hw: tuple[int, int]) -> torch.Tensor:
    """DINOv2's position embedding for ``input_hw`` as transformers computes it per forward: bicubic, in
    float32 (with antialiasing in the registers variant)."""
    prefix = 0 if config.register_tokens else 1
    grid = [s // q for s, q in zip(config.image_size, config.patch_size)]
    new = [s // q for s, q in zip(input_hw, config.patch_size)]
    patches = pos[:, prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()
    patches = nn.functional.interpolate(patches, size=new, mode="bicubic", align_corners=False,
                                        antialias=config.register_tokens > 0)
    return torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


def _input_size(config: HfConfig, preprocessing: dict) -> tuple[int, int]:
    """The image size the model runs at: DINOv2 at its processor's output size (transformers resamples its
    position embedding to any size), ViT and DeiT at the config's (transformers refuses any other)."""
    if config.family.layout != "dinov2":
        return config.image_size
    crop, size = preprocessing.get("crop_size"), preprocessing.get("size") or {}
    chosen = crop if preprocessing.get("do_center_crop", True) and crop else size
    if isinstance(chosen, dict) and "height" in chosen:
        return int(chosen["height"]), int(chosen["width"])
    return config.image_size


def _data_config(preprocessing: dict, config: HfConfig, input_hw: tuple[int, int], num_classes: int) -> dict:
    """timm's ``pretrained_cfg`` for the image processor's settings: mean, std, resampling, and resize-then-crop
    as ``crop_pct`` (``squash`` where the processor resizes to a fixed height and width)."""
    normalize = preprocessing.get("do_normalize", True)
    size = preprocessing.get("size") or {}
    crop = preprocessing.get("crop_size") if preprocessing.get("do_center_crop") else None
    resized = size.get("shortest_edge") or size.get("height")
    crop_pct = min(1.0, int(crop["height"]) / int(resized)) if isinstance(crop, dict) and resized else 1.0
    return {"input_size": (config.channels, *input_hw),
            "mean": tuple(preprocessing.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0,) * config.channels,
            "std": tuple(preprocessing.get("image_std", IMAGENET_STD)) if normalize else (1.0,) * config.channels,
            "interpolation": PIL_RESAMPLE.get(preprocessing.get("resample", 3), "bicubic"),
            "crop_pct": crop_pct, "crop_mode": "squash" if "height" in size else "center",
            "num_classes": num_classes, "label_names": config.class_names}


def _classes(config: HfConfig, state: dict[str, torch.Tensor], path: Path) -> int:
    """The classifier's output count (from its weight), checked against ``id2label``."""
    key = "cls_classifier.weight" if config.family.head == "distilled" else "classifier.weight"
    if key not in state:
        raise ModelError(f"{path}: the weights hold no classifier ({key}): {config.architecture} needs its head")
    classes = int(state[key].shape[0])
    if config.class_names is not None and len(config.class_names) != classes:
        raise ModelError(f"{path}: config.json's id2label names {len(config.class_names)} classes but the "
                         f"classifier has {classes} outputs")
    return classes


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every tensor of ``model`` from ``state`` (cast to the model's dtype); missing or extra tensors,
    shape mismatches and NaN/inf values are a :class:`ModelError`."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if unexpected:
        raise ModelError(f"{path}: {len(unexpected)} tensors of the weights have no place in the config's "
                         f"architecture (e.g. timm's {unexpected[0]}): is config.json the one saved with them?")
    if missing:
        raise ModelError(f"{path}: the weights lack {len(missing)} tensors the config's architecture needs "
                         f"(e.g. timm's {missing[0]}): is config.json the one saved with these weights?")
    wrong = sorted(k for k in own if own[k].shape != state[k].shape)
    if wrong:
        raise ModelError(f"{path}: {len(wrong)} tensors do not fit config.json (e.g. timm's {wrong[0]}: "
                         f"{tuple(state[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} by the config)")
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:
        raise ModelError(f"{path}: the weights hold NaN or infinite values in {len(broken)} tensors "
                         f"(e.g. timm's {broken[0]}): not a usable model")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _weights_file(path: Path) -> Path:
    """The directory's weights, safetensors first; a :class:`ModelError` when there are none."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise ModelError(f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)}): vitcompress never "
                     "substitutes random weights for a checkpoint's")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a sharded safetensors index or a ``pytorch_model.bin`` (``weights_only``);
    an unreadable file is one :class:`ModelError`."""
    try:
        if file.name.endswith(".index.json"):
            shards = sorted(set(_read_json(file)["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_weights(file.parent / shard).items()}
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # corrupt files raise many types (SafetensorError, UnpicklingError, EOFError, KeyError…)
        raise ModelError(f"weights {file} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights {file} hold no state dict of tensors")
    return state


def _read_json(file: Path) -> dict:
    """A JSON object from ``file``; unreadable or not an object is a :class:`ModelError`."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} is not a JSON object")
    return data


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """An HF size (an int or a [height, width] list) as (height, width)."""
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[0]), int(value[1]))
