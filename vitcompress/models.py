"""Model loading: aliases, timm architectures, checkpoint files and the embedded reference model.

Weights come from exactly one place, stated in :class:`LoadedModel.weights`: a ``--checkpoint`` file,
timm's pretrained download, the embedded ``vit_fmnist`` weights, or an explicit random init. There is no
silent fallback to random weights: an offline download failure is an error that says how to pass a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from vitcompress.data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
from vitcompress.errors import ModelError

log = logging.getLogger(__name__)

ALIASES: dict[str, str] = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
}
REFERENCE_MODEL = "vit_fmnist"
REFERENCE_WEIGHTS = "vit_fmnist.safetensors"
REFERENCE_CFG = {
    "input_size": (1, 28, 28),
    "mean": FMNIST_MEAN,
    "std": FMNIST_STD,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "num_classes": len(FMNIST_CLASSES),
    "label_names": list(FMNIST_CLASSES),
}


@dataclass
class LoadedModel:
    """A model in eval mode plus where its weights came from and how to preprocess its inputs."""

    model: nn.Module
    name: str
    weights: str
    data_config: dict
    class_names: list[str] | None


def resolve_name(name: str) -> str:
    """Alias → timm name; checks the name exists so a typo fails before any work."""
    import timm

    resolved = ALIASES.get(name, name)
    if resolved != REFERENCE_MODEL and not timm.is_model(resolved):
        import difflib

        close = difflib.get_close_matches(resolved, [*ALIASES, REFERENCE_MODEL, *timm.list_models()], n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}: use a timm model name, {REFERENCE_MODEL!r} or an alias "
            f"({', '.join(sorted(ALIASES))}){hint}"
        )
    return resolved


def build_reference_architecture() -> nn.Module:
    """The ``vit_fmnist`` architecture (design.md §5): DeiT-Tiny blocks on 28×28 single-channel images."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=len(FMNIST_CLASSES),
        embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
    )
    model.pretrained_cfg = dict(REFERENCE_CFG)
    return model


def reference_weights_path() -> Path:
    """Path of the fp16 weights shipped inside the package."""
    return Path(str(resources.files("vitcompress") / "weights" / REFERENCE_WEIGHTS))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt file (``weights_only=True``), unwrapping common containers."""
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types (SafetensorError, UnpicklingError, EOFError…)
        raise ModelError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head_classes(state: dict[str, torch.Tensor]) -> int | None:
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly after timm's key remapping for the model's family (e.g. original DeiT/JAX keys)."""
    import importlib

    family = importlib.import_module(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise ModelError(f"checkpoint {source} does not fit {type(model).__name__}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = sorted(mismatched)[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ModelError(f"checkpoint {source} is for another architecture: " + "; ".join(parts))
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:
        raise ModelError(f"checkpoint {source} holds NaN or infinite values in {len(broken)} tensors "
                         f"(e.g. {broken[0]}): it is not a usable model")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_model(name: str, checkpoint: Path | None = None, random_init: bool = False) -> LoadedModel:
    """Build ``name`` and load its weights; see the module docstring for where weights come from."""
    import timm

    if checkpoint is not None and random_init:
        raise ModelError("--checkpoint and --random-init exclude each other")
    resolved = resolve_name(name)
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if resolved == REFERENCE_MODEL:
        model = build_reference_architecture()
        if state is None and not random_init:
            path = reference_weights_path()
            if not path.is_file():
                raise ModelError(f"embedded weights {path} are missing: run examples/train_reference.py")
            state, weights = read_state_dict(path), f"embedded ({REFERENCE_WEIGHTS})"
    else:
        kwargs = {}
        classes = _head_classes(state) if state is not None else None
        if classes is not None:
            kwargs["num_classes"] = classes
        if state is None and not random_init:
            model = _download_pretrained(resolved)
            weights = f"timm pretrained ({resolved})"
        else:
            model = timm.create_model(resolved, pretrained=False, **kwargs)
    if checkpoint is not None:
        weights = f"checkpoint {checkpoint}"
    if random_init:
        weights = "random init (latency only: accuracy numbers are meaningless)"
    if state is not None:
        load_weights(model, state, str(checkpoint or weights))
    model.eval()
    data_config = timm.data.resolve_data_config(model=model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    class_names = cfg.get("label_names")
    log.info("loaded %s (%s)", resolved, weights)
    return LoadedModel(model=model, name=resolved, weights=weights, data_config=data_config,
                       class_names=list(class_names) if class_names else None)


def _download_pretrained(resolved: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(resolved, pretrained=True)
    except Exception as exc:
        raise ModelError(
            f"could not fetch pretrained weights for {resolved} ({type(exc).__name__}; offline?): "
            "pass a local file with --checkpoint PATH (.safetensors, .pth or .pt), "
            "or --random-init for latency-only work"
        ) from None
