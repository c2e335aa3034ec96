"""A cache of the original model's ONNX file and its onnxruntime predictions, that conversions share when the
caller passes them the same :class:`OriginalCache`.

Every conversion exports the original and runs it over the validation images: the baseline the converted model
is compared with. Converting several recipes of one model in one process (a loop over recipes in Python,
``bench/run.py``, each ``convert(..., cache=cache)``) would repeat identical work each time — on ``vit_fmnist``
about 6 s of export and 30 s of 10,000-image inference per conversion. Both are looked up by content, so a hit is the same result:

- the export by the original's weights (sha256 of its state dict), its structure (every module's class and
  plain attributes, e.g. ``num_heads``), the input size, the export settings and the metadata;
- the predictions by the sha256 of that ONNX file, the data's :attr:`~vitcompress.context.DataBundle.cache_key`
  and the thread count. Only data that cannot change between runs has a key (the built-in Fashion-MNIST and
  synthetic sets): images from a directory or a Python ``Dataset`` are always predicted afresh.

At most :data:`MAX_ONNX_BYTES` of ONNX files are kept (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

MAX_ONNX_BYTES = 512 << 20
MAX_PREDICTIONS = 16
T = TypeVar("T")


def model_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s weights and structure: two modules with this digest compute the same function."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        plain = sorted((k, v) for k, v in vars(module).items()
                       if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple)))
        digest.update(repr((name, type(module).__qualname__, plain)).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OriginalCache:
    """The original's ONNX files (by :func:`model_digest` and export settings) and its predictions (by file digest,
    data key and threads), least recently used dropped first; one per caller, no module state."""

    def __init__(self, max_onnx_bytes: int = MAX_ONNX_BYTES, max_predictions: int = MAX_PREDICTIONS) -> None:
        self.max_onnx_bytes = max_onnx_bytes
        self.max_predictions = max_predictions
        self._onnx: OrderedDict[str, bytes] = OrderedDict()
        self._predictions: OrderedDict[str, object] = OrderedDict()

    def exported(self, key: str, path: Path, export: Callable[[Path], Path]) -> Path:
        """The ONNX file for ``key`` at ``path``: copied from the cache, or written by ``export(path)`` and kept."""
        if key in self._onnx:
            self._onnx.move_to_end(key)
            path.write_bytes(self._onnx[key])
            return path
        export(path)
        self._onnx[key] = path.read_bytes()
        while sum(map(len, self._onnx.values())) > self.max_onnx_bytes and len(self._onnx) > 1:
            self._onnx.popitem(last=False)
        return path

    def predicted(self, key: str | None, compute: Callable[[], T]) -> tuple[T, bool]:
        """(``compute()``'s result, False), or (the kept result for ``key``, True); a None key is never kept."""
        if key is not None and key in self._predictions:
            self._predictions.move_to_end(key)
            return self._predictions[key], True
        value = compute()
        if key is not None:
            self._predictions[key] = value
            while len(self._predictions) > self.max_predictions:
                self._predictions.popitem(last=False)
        return value, False

    def clear(self) -> None:
        """Forget everything kept (a caller that changed a data set on disk)."""
        self._onnx.clear()
        self._predictions.clear()
