"""Classify image files with a bundle, onnxruntime only (``vitcompress predict``; never imports torch).

A bundle directory runs its ``model.onnx``, or its low/high-effort cascade when it has ``cascade.json``; a
single ``.onnx``/``.ort`` file runs alone. Images are read and preprocessed one batch at a time (memory stays
bounded by a batch); the class names come from ``labels.txt`` or the ONNX metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitcompress.deploy.bundle import LABELS, MODEL, label_lines
from vitcompress.deploy.runtime import (
    CASCADE_FILE,
    CPU,
    INPUT_NAME,
    LOGITS,
    Cascade,
    Preprocessing,
    image_files,
    open_session,
    softmax,
)
from vitcompress.errors import ModelError


class BundlePredictor:
    """The model of a bundle (or one ONNX file), its preprocessing and its labels."""

    def __init__(self, path: str | Path, threads: int = 2, provider: str = CPU, cascade_only: bool = False) -> None:
        """Open the bundle (or ONNX file) at ``path``; ``cascade_only``: refuse a bundle without a cascade."""
        path = Path(path)
        self.cascade: Cascade | None = None
        if path.is_dir() and ((path / CASCADE_FILE).is_file() or cascade_only):
            self.cascade = Cascade(path, threads, provider)
            metadata, outputs = self.cascade.metadata, self.cascade.low.get_outputs()
        elif path.is_dir() or path.is_file():
            model = path / MODEL if path.is_dir() else path
            if not model.is_file():
                raise ModelError(f"{path} is not a bundle: no {MODEL} (a vitcompress convert output directory)")
            self.session = open_session(model, threads, provider=provider)
            metadata, outputs = self.session.get_modelmeta().custom_metadata_map, self.session.get_outputs()
        else:
            raise ModelError(f"bundle {path} does not exist")
        self.preprocessing = Preprocessing.from_metadata(metadata)
        logits = next((o for o in outputs if o.name == LOGITS), outputs[0])
        self.classes = int(logits.shape[-1])
        labels_file = path / LABELS if path.is_dir() else None
        self.labels = (labels_file.read_text().splitlines() if labels_file and labels_file.is_file()
                       else label_lines(metadata, self.classes))
        if len(self.labels) != self.classes:
            raise ModelError(f"{labels_file} has {len(self.labels)} labels for a model with {self.classes} outputs")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of a preprocessed batch, and per image the cascade's entropy and exit (for a cascade)."""
        if self.cascade is None:
            return self.session.run([LOGITS], {INPUT_NAME: batch})[0], {}
        result = self.cascade.predict(batch)
        return result.logits, {"entropy": result.entropy, "early": result.early}

    def predict(self, inputs: Sequence[str | Path], *, batch_size: int = 32, top_k: int = 5) -> list[dict]:
        """Per image (files and directories of images, in order): its path, top-k labels and probabilities.

        Raises DataError for a missing or unreadable image or a directory without images (before any output).
        """
        files = image_files(list(inputs))
        rows = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            logits, extra = self.run(self.preprocessing.load(chunk))
            probabilities = softmax(logits.astype(np.float64))
            for i, (path, p) in enumerate(zip(chunk, probabilities)):
                top = np.argsort(-p, kind="stable")[:top_k]
                row = {"path": str(path), "labels": [self.labels[k] for k in top],
                       "classes": [int(k) for k in top], "probabilities": [float(p[k]) for k in top]}
                if extra:
                    row["entropy"] = float(extra["entropy"][i])
                    row["model"] = "low" if extra["early"][i] else "high"
                rows.append(row)
        return rows
