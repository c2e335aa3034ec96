"""Model loading: aliases, timm architectures, checkpoint files and the embedded reference model.

Weights come from exactly one place, stated in :class:`LoadedModel.weights`: a ``--checkpoint`` file,
timm's pretrained download, the embedded ``vit_fmnist`` weights, a Hugging Face checkpoint directory
(:mod:`vitcompress.hf_checkpoint`), or an explicit random init. There is no
silent fallback to random weights: an offline download failure is an error that says how to pass a file.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
from vitcompress.errors import DataError, ModelError
from vitcompress.hf_checkpoint import is_hf_directory, load_hf_directory
from vitcompress.labels import ClassSpace

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
REFERENCE_PATCH_SIZES = {REFERENCE_MODEL: 4, "vit_fmnist196": 2}
"""The embedded reference models: the same DeiT-Tiny widths on 28×28 images, patch 4 → 49 patch tokens (50 with
the class token) or patch 2 → 196, a real ViT-224's token count, where token merging and attention transforms
matter as they do on DeiT (issue 17)."""
REFERENCE_MODELS = tuple(REFERENCE_PATCH_SIZES)
RANDOM_INIT_SEED = 0
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
    """Alias → timm name (a Hugging Face checkpoint directory stays its path); checks the name exists so a typo
    fails before any work."""
    import timm

    resolved = ALIASES.get(name, name)
    if is_hf_directory(resolved):
        return resolved
    if resolved not in REFERENCE_MODELS and not timm.is_model(resolved):
        import difflib

        if Path(name).is_dir():
            raise ModelError(f"{name} is a directory without config.json: a Hugging Face checkpoint directory "
                             "holds config.json and model.safetensors (docs/models.md)")
        close = difflib.get_close_matches(resolved, [*ALIASES, *REFERENCE_MODELS, *timm.list_models()], n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}: use a timm model name, {' or '.join(map(repr, REFERENCE_MODELS))} or an alias "
            f"({', '.join(sorted(ALIASES))}){hint}"
        )
    return resolved


def chosen_name(model: str | None, recipe_model: str | None) -> str:
    """The model a command converts: the one given (it wins), else the recipe's ``model:``; checked to exist
    (:func:`resolve_name`) before anything loads. One place for ``convert``, ``plan`` and ``batch``."""
    name = model or recipe_model
    if name is None:
        raise ModelError("no model given: name one (e.g. vit_fmnist, deit_s) or set `model:` in the recipe")
    resolve_name(name)
    return name


def build_reference_architecture(name: str = REFERENCE_MODEL, **model_args: Any) -> nn.Module:
    """A reference architecture (docs/reference-models.md): DeiT-Tiny blocks on 28×28 single-channel images, the patch size
    of ``name``; ``model_args`` replace its VisionTransformer arguments (e.g. ``depth=2``, as ``--model-arg``)."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=28, patch_size=REFERENCE_PATCH_SIZES[name], in_chans=1, num_classes=len(FMNIST_CLASSES),
                embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0)
    model = VisionTransformer(**{**args, **model_args})
    model.pretrained_cfg = dict(REFERENCE_CFG)
    return model


def reference_weights_path(name: str = REFERENCE_MODEL) -> Path:
    """Path of the reference model's fp16 weights shipped inside the package."""
    return Path(str(resources.files("vitcompress") / "weights" / f"{name}.safetensors"))


def embedded_weights(name: str) -> Path:
    """The shipped weights of reference model ``name``; a :class:`ModelError` saying how to make them when they
    are not in the package (a source checkout without them, or a model added before its weights)."""
    path = reference_weights_path(name)
    if not path.is_file():
        raise ModelError(f"embedded weights {path} are missing: run examples/train_reference.py --model {name}")
    return path


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (``--model-arg depth=2``; values parsed as YAML) as keyword arguments for
    ``timm.create_model``."""
    import yaml

    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelError(f"--model-arg {item!r}: expected NAME=VALUE, e.g. depth=2")
        try:
            args[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ModelError(f"--model-arg {item!r}: value is not valid YAML") from None
    return args


def check_model_args(model_args: Mapping[str, Any] | None, checkpoint: Path | None, random_init: bool) -> None:
    """Architecture arguments build a model that no checkpoint or pretrained weights fit: random init only."""
    if model_args and (checkpoint is not None or not random_init):
        weights = "--checkpoint" if checkpoint is not None else "pretrained weights"
        raise ModelError(f"--model-arg {', '.join(model_args)} changes the architecture, which {weights} do not "
                         "fit: use it with --random-init (e.g. a shallow copy for a smoke test)")


def model_args_text(model_args: Mapping[str, Any]) -> str:
    """``depth=2, embed_dim=64``: model arguments as the report and messages show them."""
    return ", ".join(f"{k}={v!r}" for k, v in model_args.items())


def _create(resolved: str, model_args: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """``timm.create_model`` (or the reference architecture) without weights, with ``model_args``; arguments the
    architecture does not take are a ModelError."""
    import timm

    try:
        if resolved in REFERENCE_MODELS:
            return build_reference_architecture(resolved, **model_args)
        return timm.create_model(resolved, pretrained=False, **kwargs, **model_args)
    except (TypeError, ValueError, AssertionError) as exc:
        if not model_args:
            raise
        raise ModelError(f"--model-arg {model_args_text(model_args)} does not build {resolved}: "
                         f"{type(exc).__name__}: {exc}") from None


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


def load_model(name: str, checkpoint: Path | None = None, random_init: bool = False,
               model_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """Build ``name`` and load its weights; see the module docstring for where weights come from.

    ``model_args`` (random init only) are passed to ``timm.create_model``, e.g. ``depth=2`` for a shallow copy
    of the architecture that exports and validates in seconds."""
    if checkpoint is not None and random_init:
        raise ModelError("--checkpoint and --random-init exclude each other")
    if is_hf_directory(name):
        if checkpoint is not None or random_init or model_args:
            raise ModelError(f"{name} is a Hugging Face checkpoint with its own weights and architecture: leave "
                             "out --checkpoint, --random-init and --model-arg")
        hf = load_hf_directory(Path(name))
        return _loaded(hf.model, name, hf.weights)
    check_model_args(model_args, checkpoint, random_init)
    model_args = dict(model_args or {})
    resolved = resolve_name(name)
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # a random init is the same on every run: results can be compared
        if resolved in REFERENCE_MODELS:
            model = _create(resolved, model_args)
            if state is None and not random_init:
                path = embedded_weights(resolved)
                state, weights = read_state_dict(path), f"embedded ({path.name})"
        else:
            kwargs = {}
            classes = _head_classes(state) if state is not None else None
            if classes is not None:
                kwargs["num_classes"] = classes
            if state is None and not random_init:
                model = _download_pretrained(resolved)
                weights = f"timm pretrained ({resolved})"
            else:
                model = _create(resolved, model_args, **kwargs)
    if checkpoint is not None:
        weights = f"checkpoint {checkpoint}"
    if random_init:
        weights = f"random init, seed {RANDOM_INIT_SEED} (latency only: accuracy numbers are meaningless)"
        if model_args:
            weights += f"; architecture changed: {model_args_text(model_args)}"
    if state is not None:
        load_weights(model, state, str(checkpoint or weights))
    return _loaded(model, resolved, weights)


def _fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) a ViT-style model's patch embedding requires, or None when it takes any size."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(embed, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def _loaded(model: nn.Module, name: str, weights: str) -> LoadedModel:
    """``model`` in eval mode with its preprocessing and class names from its ``pretrained_cfg``."""
    import timm

    model.eval()
    data_config = timm.data.resolve_data_config(model=model)
    built = _fixed_image_size(model)
    if built is not None and tuple(data_config["input_size"][1:]) != built:
        # built at another size than its pretrained config says (e.g. --model-arg img_size=160): the model's own
        # patch embedding is what its inputs must match
        data_config["input_size"] = (data_config["input_size"][0], *built)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    class_names = cfg.get("label_names")
    log.info("loaded %s (%s)", name, weights)
    return LoadedModel(model=model, name=name, weights=weights, data_config=data_config,
                       class_names=list(class_names) if class_names else None)


HUB_CONNECT_TIMEOUT_S = 2.0
QUIET_LOGGERS = ("huggingface_hub", "timm")
NO_WEIGHTS_ADVICE = ("pass a local file with --checkpoint PATH (.safetensors, .pth or .pt), "
                     "or --random-init for latency-only work")


def check_pretrained_available(name: str) -> Path | None:
    """The local file of ``name``'s pretrained weights (None: not cached, but their host answers); neither is a
    :class:`ModelError` at once. The CLI calls this before importing the pipeline, so offline fails in seconds."""
    import timm

    resolved = resolve_name(name)
    if resolved in REFERENCE_MODELS:
        return reference_weights_path(resolved)
    if is_hf_directory(resolved):
        return Path(resolved)  # its weights are read (and checked) when it loads
    cfg = timm.models.get_pretrained_cfg(resolved)
    cfg = cfg.to_dict() if cfg is not None else {}
    cached = _cached_weights(cfg)
    if cached is None and not _weights_host_reachable(cfg):
        raise ModelError(f"pretrained weights for {resolved} are not cached and {_weights_host(cfg)[0]} cannot "
                         f"be reached (offline?): {NO_WEIGHTS_ADVICE}")
    return cached


def _download_pretrained(resolved: str) -> nn.Module:
    """timm's pretrained weights: a locally cached copy without touching the network, else a download when
    the weights' host answers; offline, a :class:`ModelError` at once instead of huggingface_hub's retries."""
    import timm

    cached = check_pretrained_available(resolved)
    try:
        with _quiet_hub():
            if cached is not None:
                return timm.create_model(resolved, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
            return timm.create_model(resolved, pretrained=True)
    except Exception as exc:
        raise ModelError(f"could not fetch pretrained weights for {resolved} ({type(exc).__name__}): "
                         f"{NO_WEIGHTS_ADVICE}") from None


def _cached_weights(cfg: dict) -> Path | None:
    """The file timm would download for ``cfg`` when it is already local: the Hugging Face hub cache (timm's
    first source, safetensors before the pickle) or torch hub's checkpoint folder (URL sources)."""
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        from urllib.parse import urlparse

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        if path.is_file():
            return path
    return None


def _weights_host(cfg: dict) -> tuple[str, int]:
    """Host and port a download of ``cfg``'s weights connects to first: an HTTPS proxy when one is set, else
    the Hugging Face endpoint (``HF_ENDPOINT``) for hub weights, else the weights' URL."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    proxy = getproxies().get("https")
    if proxy:
        parsed = urlparse(proxy)
        return parsed.hostname or "", parsed.port or 443
    if cfg.get("hf_hub_id") or not cfg.get("url"):
        from huggingface_hub import constants

        parsed = urlparse(constants.ENDPOINT)
    else:
        parsed = urlparse(cfg["url"])
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


def _weights_host_reachable(cfg: dict) -> bool:
    """Whether a TCP connection to the weights' host opens within :data:`HUB_CONNECT_TIMEOUT_S` (name lookup
    included: it runs in a daemon thread, since a dead resolver is not bounded by the socket timeout).
    ``HF_HUB_OFFLINE`` counts as no connection for hub weights."""
    import socket
    import threading

    from huggingface_hub import constants

    if cfg.get("hf_hub_id") and constants.is_offline_mode():
        return False
    host, port = _weights_host(cfg)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_CONNECT_TIMEOUT_S + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's and timm's retry warnings while fetching: a failure becomes one ModelError."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def model_classes(loaded: LoadedModel) -> ClassSpace:
    """The class space of a loaded model: its output count and class names (ImageNet's, for a 1000-way head)."""
    return ClassSpace.of(int(loaded.model.num_classes), loaded.class_names)


def default_data(model_name: str, random_init: bool) -> str:
    """Data used when ``--data`` is not given: the reference model's own, noise for latency-only runs."""
    if model_name in REFERENCE_MODELS:
        return "fmnist"
    if random_init:
        return "synthetic"
    raise DataError("no data given: pass --data DIR (ImageFolder layout), --data fmnist or --data synthetic")
