"""``report.html`` of one bundle, from its files alone: report.json, predictions.npz, report/, labels.txt.

Nothing runs a model: ``vitcompress report BUNDLE`` rebuilds the page from what ``convert`` kept, and the
conversion's last stage writes it the same way. SHA256SUMS does not list the page (a view of files it does list),
so rebuilding it leaves the bundle's checksums valid; the page shows whether they still hold.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from vitcompress.deploy.bundle import LABELS, PAGE, check_checksums
from vitcompress.errors import ModelError
from vitcompress.page import charts
from vitcompress.page.assets import environment
from vitcompress.report import DataSplit, Report
from vitcompress.sensitivity_file import SENSITIVITY, read_sensitivity

#: Rows of the per-class table: the classes that lost most agreement first.
MAX_CLASSES = 20


@dataclass
class Guess:
    name: str
    percent: float


@dataclass
class Disagreement:
    """One image the original and the converted model classify differently, with both top-k."""

    image: str
    source: str
    label: str | None
    original: list[Guess]
    converted: list[Guess]


@dataclass
class ClassRow:
    name: str
    images: int
    agreement: float
    original_top1: float | None
    converted_top1: float | None


def load_report(bundle: Path) -> Report:
    """The bundle's report.json, or a ModelError saying why there is none to render."""
    if not bundle.is_dir():
        raise ModelError(f"{bundle} is not a directory: give the output directory of vitcompress convert")
    try:
        return Report.load(bundle / "report.json")
    except FileNotFoundError:
        raise ModelError(f"{bundle} has no report.json: give the output directory of vitcompress convert") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelError(f"{bundle}/report.json is not a vitcompress report: {str(exc).splitlines()[0]}") from None


def class_names(bundle: Path) -> list[str]:
    path = bundle / LABELS
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def checksum_status(bundle: Path) -> tuple[bool, str]:
    """Whether every file SHA256SUMS lists is there unchanged, and the sentence that says so."""
    try:
        return True, f"{len(check_checksums(bundle))} files match SHA256SUMS"
    except ModelError as exc:
        return False, str(exc)


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _guesses(top: np.ndarray, prob: np.ndarray, names: list[str]) -> list[Guess]:
    return [Guess(_name(names, int(c)), float(p) * 100) for c, p in zip(top, prob)]


def disagreements(bundle: Path, report: Report, arrays: dict, names: list[str]) -> list[Disagreement]:
    """The disagreements the bundle has thumbnails of, with both models' top-k."""
    result = []
    for shown in report.explain.shown:
        i, path = shown.position, bundle / shown.thumbnail
        image = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""
        label = int(arrays["labels"][i])
        result.append(Disagreement(image, shown.source, _name(names, label) if label >= 0 else None,
                                   _guesses(arrays["original_top"][i], arrays["original_prob"][i], names),
                                   _guesses(arrays["converted_top"][i], arrays["converted_prob"][i], names)))
    return result


def class_rows(arrays: dict, names: list[str]) -> tuple[list[ClassRow], int]:
    """Per class (the label, or the original's top-1 without labels): images, agreement and both top-1 (%),
    lowest agreement first, at most :data:`MAX_CLASSES`; and how many classes there were."""
    labels, original, converted = arrays["labels"], arrays["original_top"][:, 0], arrays["converted_top"][:, 0]
    labelled = bool((labels >= 0).any())
    by = labels if labelled else original
    rows = []
    for cls in np.unique(by[by >= 0]):
        mask = by == cls
        rows.append(ClassRow(_name(names, int(cls)), int(mask.sum()), float((original[mask] == converted[mask]).mean()),
                             float((original[mask] == cls).mean() * 100) if labelled else None,
                             float((converted[mask] == cls).mean() * 100) if labelled else None))
    rows.sort(key=lambda row: (row.agreement, row.name))
    return rows[:MAX_CLASSES], len(rows)


def split_text(split: DataSplit | None) -> str:
    if split is None:
        return "in-memory data"
    if split.kind == "held-out":
        return (f"held-out split: {split.holdout_fraction * 100:g} % of each class ({split.held_out_images} images, "
                f"seed {split.seed}), never used for calibration or fine-tuning")
    return {"directories": "DIR/val (DIR/train calibrates and fine-tunes)"}.get(split.kind,
                                                                                  "the dataset's own test split")


def render(bundle: Path, sensitivity: Path | None = None) -> str:
    """The HTML of ``bundle``'s page; ``sensitivity``: a sensitivity.json to draw instead of the bundle's copy."""
    report = load_report(bundle)
    names = class_names(bundle)
    explain = report.explain
    arrays = {}
    if explain is not None and (bundle / explain.predictions).is_file():
        with np.load(bundle / explain.predictions, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    if sensitivity is None and explain is not None and explain.sensitivity:
        sensitivity = bundle / explain.sensitivity
    sensitive = read_sensitivity(sensitivity) if sensitivity is not None else None
    figures = {"latency": charts.latency_figure(report)}
    if report.profile:
        figures["blocks"] = charts.blocks_figure(report.profile)
    if explain is not None and explain.end_to_end is not None:
        figures["e2e"] = charts.end_to_end_figure(explain.end_to_end.preprocess_ms, explain.end_to_end.model_ms)
    if sensitive is not None:
        figures["heatmap"] = charts.heatmap_figure(sensitive)
    rows, classes = class_rows(arrays, names) if arrays else ([], 0)
    recipe = bundle / "recipe.resolved.yaml"
    ok, status = checksum_status(bundle)
    return environment().get_template("report.html.j2").render(
        report=report, explain=explain, figures=figures, split=split_text(report.data.split),
        disagreements=disagreements(bundle, report, arrays, names) if arrays else [], class_rows=rows,
        classes=classes, recipe=recipe.read_text(errors="replace") if recipe.is_file() else None,
        checksums_ok=ok, checksums=status, sensitivity=SENSITIVITY if sensitive is not None else None)


def write_report_page(bundle: str | Path, sensitivity: str | Path | None = None) -> Path:
    """Write ``bundle/report.html`` (replaced atomically) and return its path."""
    bundle = Path(bundle)
    text = render(bundle, Path(sensitivity) if sensitivity is not None else None)
    descriptor, temporary = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=bundle)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, bundle / PAGE)
    return bundle / PAGE
