"""The batch manifest: a strict pydantic schema, loaded with the recipe loader's guards, expanded into jobs.

```yaml
version: 1
defaults: {data: fmnist, timeout: 900, set: [finetune.steps=50], gates: {min_agreement: 0.9}}
matrix: {models: [vit_fmnist], recipes: [svd, fast]}      # cartesian: jobs vit_fmnist-svd, vit_fmnist-fast
jobs:
  - {name: deit-svd, model: deit_s, checkpoint: ckpt/deit_s.pth, recipe: svd, cadence: [nightly]}
```

Everything is checked before any job runs: unknown keys, wrong types, names, duplicate or overlapping job
names, recipes (each loaded with its overrides), checkpoints, data directories and gates on batch sizes that the
recipe does not measure. Every problem is one :class:`ManifestError` naming the file and key path (exit 2).
Relative paths are relative to the manifest's folder (a recipe may also be a shipped recipe's name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vitcompress.errors import RecipeError, VitCompressError
from vitcompress.recipe import Recipe, format_validation_error, load_recipe, read_recipe_file, resolve_recipe
from vitcompress.transforms.select import blocks_needed

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
#: Data sources that are not directories.
DATA_NAMES = ("fmnist", "synthetic")
PerBatch = Union[float, dict[str, float]]


class ManifestError(VitCompressError):
    """A manifest file is malformed, or names a recipe, checkpoint or directory that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Gates(_Strict):
    """Gates beyond the recipe's; per-batch values are one number for every batch size or ``{b1: …, b8: …}``."""

    min_speedup: Optional[PerBatch] = Field(None, description="least original/converted p50 latency ratio")
    max_latency_ms: Optional[PerBatch] = Field(None, description="largest converted p50 latency (ms)")
    max_top1_drop: Optional[float] = Field(None, ge=0, le=100, description="points of top-1 the conversion may lose")
    min_agreement: Optional[float] = Field(None, ge=0, le=1, description="least top-1 agreement with the original")
    max_abs_diff: Optional[float] = Field(None, gt=0, description="largest |torch − ORT| on the logits")


class Baseline(_Strict):
    """What ``--baseline`` counts as a regression against the previous ``batch.json``."""

    top1_points: float = Field(0.5, ge=0, description="converted top-1 may fall this many points")
    agreement: float = Field(0.01, ge=0, le=1, description="agreement may fall this much")
    speedup_margin: float = Field(0.15, ge=0, lt=1, description="speed-up may fall this fraction (timing noise)")


class _JobSettings(_Strict):
    """Settings that ``defaults``, ``matrix`` and each job may give (the more specific one wins; ``set`` adds)."""

    data: Optional[str] = Field(None, description="fmnist, synthetic or an image directory")
    random_init: Optional[bool] = None
    checkpoint: Optional[str] = None
    timeout: Optional[float] = Field(None, gt=0, le=7 * 24 * 3600, description="seconds before the job is killed")
    overrides: list[str] = Field(default_factory=list, alias="set")
    gates: Gates = Field(default_factory=Gates)
    cadence: Optional[list[str]] = Field(None, description="cadences that run the job (none: every cadence)")


class Matrix(_JobSettings):
    models: list[str] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)


class JobSpec(_JobSettings):
    name: str = Field(pattern=NAME_PATTERN)
    model: Optional[str] = Field(None, description="default: the recipe's model")
    recipe: str


class Manifest(_Strict):
    version: Literal[1]
    defaults: _JobSettings = Field(default_factory=_JobSettings)
    matrix: Optional[Matrix] = None
    jobs: list[JobSpec] = Field(default_factory=list)
    baseline: Baseline = Field(default_factory=Baseline)


@dataclass
class Job:
    """One conversion to run: everything resolved (paths absolute, recipe loaded with its overrides)."""

    name: str
    where: str  # key path in the manifest, for messages
    model: str
    recipe_path: Path
    recipe: Recipe
    overrides: list[str]
    checkpoint: Optional[Path]
    data: Optional[str]
    random_init: bool
    timeout: float
    gates: Gates
    cadence: Optional[list[str]]
    #: ``convert --model-arg``s: under ``--smoke`` the shallow copy's ``depth`` (:func:`smoke_model_args`)
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedManifest:
    path: Path
    manifest: Manifest
    jobs: list[Job]
    #: :func:`manifest_fingerprint`: recorded by every shard, so that merge refuses results of different manifests
    fingerprint: str = ""


def manifest_fingerprint(path: Path, overrides: list[str], smoke: bool, jobs: list[Job]) -> str:
    """sha256 of what decides a batch's job set: the manifest file's bytes, the command line's ``--set`` and
    ``--smoke``, and every job as resolved (name, model, recipe after overrides: an edited recipe file counts)."""
    parts = [hashlib.sha256(path.read_bytes()).hexdigest(), overrides, smoke,
             [(job.name, job.model, job.recipe.model_dump(mode="json", by_alias=True)) for job in jobs]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


DEFAULT_TIMEOUT_S = 3600.0


def load_manifest(path: Path, extra_overrides: list[str] | None = None, smoke: bool = False) -> LoadedManifest:
    """Read, validate and expand a manifest; ``extra_overrides`` go after every job's own ``set``; ``smoke``
    makes every job a random-init, synthetic-data export and parity check (no fine-tune, one batch size) of a
    shallow copy of its architecture (:func:`smoke_model_args`)."""
    try:
        data = read_recipe_file(path)
    except RecipeError as exc:
        raise ManifestError(str(exc).replace("recipe ", "manifest ", 1)) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a mapping with version, defaults, matrix and jobs, "
                            f"got {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(str(path), "", exc, Manifest)) from None
    specs: list[tuple[str, JobSpec]] = []
    if manifest.matrix is not None:
        m = manifest.matrix
        for i, model in enumerate(m.models):
            for j, recipe in enumerate(m.recipes):
                name = f"{model}-{Path(recipe).name.removesuffix('.yaml')}"
                try:
                    spec = JobSpec.model_validate({"name": name, "model": model, "recipe": recipe})
                except ValidationError:
                    raise ManifestError(f"{path}: matrix: models.{i} × recipes.{j} makes the job name {name!r}, "
                                        "not a valid name ([A-Za-z0-9][A-Za-z0-9._-]*)") from None
                specs.append((f"matrix (models.{i} × recipes.{j})", spec))
    specs += [(f"jobs.{i}", spec) for i, spec in enumerate(manifest.jobs)]
    if not specs:
        raise ManifestError(f"{path}: no jobs: give a matrix (models × recipes) or a jobs list")
    _check_names(path, specs)
    matrix_settings = manifest.matrix.model_dump(exclude_unset=True) if manifest.matrix else {}
    jobs = [_resolve(path, where, manifest.defaults, matrix_settings if where.startswith("matrix") else {}, spec,
                     extra_overrides or [], smoke) for where, spec in specs]
    return LoadedManifest(path=path, manifest=manifest, jobs=jobs,
                          fingerprint=manifest_fingerprint(path, extra_overrides or [], smoke, jobs))


def _check_names(path: Path, specs: list[tuple[str, JobSpec]]) -> None:
    """Job names are unique, also ignoring case: each names its own output folder, and two folders whose names
    differ only in case are one folder on macOS and Windows runners."""
    seen: dict[str, str] = {}
    for where, spec in specs:
        folded = spec.name.casefold()
        if folded in seen:
            raise ManifestError(f"{path}: {where}.name: job name {spec.name!r} is already used by {seen[folded]} "
                                "(names must be unique, ignoring case: each names its output folder)")
        seen[folded] = where


#: Blocks a ``--smoke`` job keeps at least (one block would leave no "other blocks" for selectors to miss).
SMOKE_MIN_DEPTH = 2
def blocks_named(node: Any) -> int:
    """The fewest blocks a recipe (its dump) needs: what its selectors need (:func:`blocks_needed`: one more than
    a fixed block index, ``blocks.11.attn`` or ``blocks\.11\.attn``; k for a relative ``blocks[-k:]``), one more
    than the highest block an ``attention_skip`` step's ``blocks`` names, and at least a CKA skip's ``count``."""
    if isinstance(node, str):
        return blocks_needed(node)
    if isinstance(node, list):
        return max((blocks_named(item) for item in node), default=0)
    if not isinstance(node, dict):
        return 0
    need = max((blocks_named(value) for value in node.values()), default=0)
    if node.get("transform") == "attention_skip":
        need = max(need, *(b + 1 for b in node.get("blocks") or ()), node.get("count") or 0)
    return need


def full_depth(model: str) -> Optional[Union[int, list[int]]]:
    """The depth of ``model`` (built on the meta device: no memory, no weights) as its ``timm.create_model``
    argument gives it: the number of blocks of a ViT-like model (a ``blocks`` list, a ``depth`` argument), the
    blocks per stage of a hierarchical one (Swin, PVT-v2: a ``depths`` argument); None for an architecture with
    neither, or a Hugging Face checkpoint directory (its architecture is its weights': no shallow copy)."""
    import timm
    import torch

    from vitcompress.hf_checkpoint import is_hf_directory
    from vitcompress.models import REFERENCE_MODELS, build_reference_architecture, resolve_name

    resolved = resolve_name(model)
    if is_hf_directory(resolved):
        return None
    with torch.device("meta"):
        built = build_reference_architecture(resolved) if resolved in REFERENCE_MODELS else timm.create_model(resolved)
    arguments = _create_arguments(built)
    blocks = getattr(built, "blocks", None)
    if blocks is not None and "depth" in arguments:
        return len(blocks)
    stages = _stage_depths(built)
    return stages if stages and "depths" in arguments else None


def _stage_depths(model: Any) -> list[int]:
    """Blocks per stage of a hierarchical model: its ``…blocks.N`` modules grouped by the path before ``blocks``."""
    from vitcompress.transforms.select import model_blocks

    per_stage: dict[str, int] = {}
    for name in model_blocks(model):
        stage = name.rsplit(".blocks.", 1)[0] if ".blocks." in name else ""
        per_stage[stage] = per_stage.get(stage, 0) + 1
    return list(per_stage.values()) if len(per_stage) > 1 else []


def _create_arguments(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).__init__).parameters)


def smoke_model_args(model: str, recipe: Recipe) -> dict[str, Any]:
    """The shallow copy of a ``--smoke`` job: with d = max(:data:`SMOKE_MIN_DEPTH`, the blocks the resolved recipe
    needs), ``{"depth": d}`` for a ViT-like model, ``{"depths": [min(n, d) per stage]}`` for a hierarchical one
    (at least d blocks in all, each stage's block index up to d − 1 kept), so every selector still matches; {}
    when that is not shallower than the model itself."""
    depth = max(SMOKE_MIN_DEPTH, blocks_named(recipe.model_dump(mode="json", by_alias=True)))
    full = full_depth(model)
    if isinstance(full, list):
        shallow = [min(n, depth) for n in full]
        return {"depths": shallow} if shallow != full else {}
    return {"depth": depth} if full is not None and depth < full else {}


SMOKE_OVERRIDES = ["finetune=null", "validate.images=16", "validate.batch_sizes=[1]", "validate.latency_runs=3",
                   "validate.warmup_runs=0", "validate.profile_runs=0", "validate.max_top1_drop=null",
                   "validate.min_agreement=null", "calibration.images=16", "calibration.batch_size=16"]


def _resolve(path: Path, where: str, defaults: _JobSettings, matrix: dict, spec: JobSpec, extra: list[str],
             smoke: bool) -> Job:
    """The job's settings (job over matrix over defaults), its recipe loaded and every path checked."""
    given = spec.model_dump(exclude_unset=True)

    def pick(key: str):
        for source in (given, matrix, defaults.model_dump(exclude_unset=True)):
            if source.get(key) is not None:
                return source[key]
        return None

    base = path.parent
    overrides = [*defaults.overrides, *matrix.get("overrides", []), *spec.overrides, *extra]
    if smoke:
        overrides += SMOKE_OVERRIDES
    recipe_path = _recipe_file(base, spec.recipe, f"{path}: {where}.recipe")
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as exc:
        raise ManifestError(f"{path}: {where}: {exc}") from None
    checkpoint = pick("checkpoint")
    checkpoint = None if checkpoint is None or smoke else _existing(base, checkpoint, f"{path}: {where}.checkpoint")
    data = "synthetic" if smoke else pick("data")
    if data is not None and data not in DATA_NAMES:
        data = str(_existing(base, data, f"{path}: {where}.data", directory=True))
    random_init = True if smoke else bool(pick("random_init"))
    model = _check_model(path, where, spec.model, recipe.model, needs_weights=checkpoint is None and not random_init)
    if random_init and checkpoint is not None:
        raise ManifestError(f"{path}: {where}: checkpoint and random_init exclude each other")
    gates = Gates.model_validate({**defaults.gates.model_dump(exclude_none=True),
                                  **(matrix.get("gates") or {}), **spec.gates.model_dump(exclude_none=True)})
    if smoke:
        gates = Gates(max_abs_diff=gates.max_abs_diff)
    _check_batch_gates(path, where, gates, recipe)
    return Job(name=spec.name, where=where, model=model, recipe_path=recipe_path, recipe=recipe,
               overrides=overrides, checkpoint=checkpoint, data=data, random_init=random_init,
               timeout=float(pick("timeout") or DEFAULT_TIMEOUT_S), gates=gates, cadence=pick("cadence"),
               model_args=smoke_model_args(model, recipe) if smoke else {})


def _recipe_file(base: Path, spec: str, where: str) -> Path:
    """A recipe relative to the manifest's folder, else as ``--recipe`` resolves it (path, or shipped name)."""
    local = base / spec
    if local.is_file():
        return local.resolve()
    try:
        return resolve_recipe(spec).resolve()
    except RecipeError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _existing(base: Path, value: str, where: str, directory: bool = False) -> Path:
    path = (base / value).resolve()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        raise ManifestError(f"{where}: {value} is not {'a directory' if directory else 'a file'} "
                            f"(relative paths start at the manifest's folder {base})")
    return path


def _check_model(path: Path, where: str, model: str | None, recipe_model: str | None, needs_weights: bool) -> str:
    """The job's model (:func:`~vitcompress.models.chosen_name`: the job's, else the recipe's), checked to exist
    and, when the job loads embedded weights, that they are in the package."""
    from vitcompress.models import REFERENCE_MODELS, chosen_name, embedded_weights, resolve_name

    try:
        name = chosen_name(model, recipe_model)
        if needs_weights and resolve_name(name) in REFERENCE_MODELS:
            embedded_weights(resolve_name(name))
    except VitCompressError as exc:
        raise ManifestError(f"{path}: {where}.model: {exc}") from None
    return name


def _check_batch_gates(path: Path, where: str, gates: Gates, recipe: Recipe) -> None:
    """A per-batch gate names only batch sizes the recipe measures (``validate.batch_sizes``)."""
    measured = {f"b{b}" for b in recipe.validate_.batch_sizes}
    for gate in ("min_speedup", "max_latency_ms"):
        value = getattr(gates, gate)
        if isinstance(value, dict):
            unknown = sorted(set(value) - measured)
            if unknown:
                raise ManifestError(f"{path}: {where}.gates.{gate}: {', '.join(unknown)} not measured (the "
                                    f"recipe's validate.batch_sizes give {', '.join(sorted(measured))})")
