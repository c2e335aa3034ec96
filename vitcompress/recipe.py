"""Recipe files: the YAML schema, loading with errors that name the file and key, ``--set`` overrides, dumping.

A recipe lists transform ``steps`` (each validated by the config class its ``transform:`` names in the
registry) and the ``calibration``, ``finetune``, ``export`` and ``validate`` settings. Everything is strict
(``extra="forbid"``): an unknown key, a wrong type or an out-of-range value is a :class:`RecipeError`.
Its ``plugins:`` (modules that register third-party transforms, :mod:`vitcompress.plugins`) are imported
before the steps are validated, so a plugin's transform is checked as strictly as a built-in one.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from vitcompress.deploy.cpus import available_cpus
from vitcompress.errors import RecipeError
from vitcompress.export_config import ExportConfig
from vitcompress.plugins import load_recipe_plugins
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformConfig
from vitcompress.yaml_file import read_yaml_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    """Images used by data-aware transforms (e.g. SVD whitening)."""

    images: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=4096)


class DistillConfig(_Strict):
    """Loss weights of the fine-tune: KL to the teacher's logits, CE on labels when the data has them, MSE to the
    teacher's final tokens."""

    logits_kl: float = Field(1.0, ge=0)
    labels_ce: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    tokens_mse: float = Field(0.0, ge=0, description="MSE between the student's and the teacher's final token "
                              "features (before the head), as DeiT / ShiftAddViT feature distillation; 0: off")


class FinetuneConfig(_Strict):
    """Brief distillation fine-tune from the original model; the budget is optimizer steps, not epochs."""

    steps: int = Field(200, ge=0, le=1_000_000, description="optimizer steps; 0: no fine-tune (as finetune: null)")
    lr: float = Field(5e-5, gt=0, le=10.0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(64, ge=1, le=4096, description="global batch: each of N torchrun processes takes "
                            "batch_size / N (which must divide evenly)")
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_loss_ratio: float = Field(10.0, gt=1, description="divergence guard: stop and restore the weights from "
                                  "before the fine-tune when the smoothed loss exceeds this multiple of the first")
    freeze_embed: bool = Field(True, description="keep patch/cls/pos embeddings frozen")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train: auto = cuda when torch sees a GPU, else cpu (the model returns to cpu)"
    )
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="autocast dtype of the forward passes (fp16 adds a gradient scaler); weights stay fp32; "
                            "auto: bf16 where the device computes it natively (a GPU that supports it, a CPU with "
                            "AVX512-BF16 or AMX), else fp32")
    workers: Optional[int] = Field(None, ge=0, le=256, description="DataLoader worker processes per rank (0: load "
                                   "in the training process); default: the cores the training threads leave free")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="save a checkpoint every this many steps (and on SIGTERM) beside the output, for "
                                "`convert --resume`; default: none")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    stages: Optional[list[list[str]]] = Field(
        None, description="staged fine-tune: apply these groups of the steps' transforms one after the other, "
                          "each followed by `steps` optimizer steps (e.g. [[shiftadd_attention], [shiftadd_moe]])",
    )


class ValidateConfig(_Strict):
    """onnxruntime validation: parity, accuracy and agreement gates, latency measurement."""

    images: Optional[int] = Field(None, ge=1, description="validation images (default: the whole split)")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class held out for validation "
                                    "when --data is one image directory (no train/ and val/)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    threads: int = Field(default_factory=lambda: min(2, available_cpus()), ge=1, le=256,
                         description="onnxruntime intra-op threads (default: 2, or fewer when this process may use "
                                     "fewer CPUs: affinity mask and cgroup quota)")
    latency_runs: int = Field(30, ge=3, le=10_000)
    warmup_runs: int = Field(5, ge=0, le=1000)
    ladder_images: int = Field(1000, ge=0, le=1_000_000, description="the accuracy ladder's image budget: each "
                               "rung (original, transformed, fine-tuned, ONNX float32, int8) is a pass over the first "
                               "this many validation images (0: no ladder)")
    profile_runs: int = Field(10, ge=0, le=10_000, description="onnxruntime-profiled runs per model for the "
                              "per-block latency (at the first batch size; 0: no profile)")
    max_abs_diff: float = Field(1e-3, gt=0, description="largest allowed |torch − ORT| on logits")
    max_top1_drop: Optional[float] = Field(None, ge=0, le=100, description="points of top-1 the conversion may lose")
    min_agreement: Optional[float] = Field(None, ge=0, le=1, description="least top-1 agreement with the original")

    @model_validator(mode="after")
    def _positive_batches(self) -> "ValidateConfig":
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError("batch_sizes must all be ≥ 1")
        return self


class CascadeConfig(_Strict):
    """Input-aware inference (PIVOT): a low-effort model for every input, the high-effort one only for inputs
    whose low-effort prediction entropy exceeds a threshold calibrated so that ``low_effort_fraction`` of the
    validation images exit early."""

    low: list[SerializeAsAny[TransformConfig]] = Field(min_length=1, description="steps of the low-effort model")
    high: Union[Literal["original"], list[SerializeAsAny[TransformConfig]]] = Field(
        "original", description="steps of the high-effort model, or 'original' (the model as loaded)")
    low_effort_fraction: float = Field(0.7, gt=0, le=1, description="fraction of inputs that exit at the low model")


class Recipe(_Strict):
    model: Optional[str] = Field(None, description="model used when the CLI names none")
    steps: list[SerializeAsAny[TransformConfig]] = Field(default_factory=list)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    finetune: Optional[FinetuneConfig] = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    cascade: Optional[CascadeConfig] = None
    plugins: list[str] = Field(default_factory=list, description="modules registering third-party transforms, "
                               "imported before the steps are validated: module names (the recipe's folder is "
                               "searched first) or .py paths relative to the recipe file")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _cascade_owns_the_steps(self) -> "Recipe":
        if self.cascade is not None and self.steps:
            raise ValueError("with cascade, give the steps as cascade.low (and cascade.high), not as steps")
        return self

    @model_validator(mode="after")
    def _cascade_is_not_quantized(self) -> "Recipe":
        """A cascade exports two models of its own (low.onnx, high.onnx) that ``export.quantize`` does not reach."""
        if self.cascade is not None and self.export.quantize != "none":
            raise ValueError("export.quantize applies to model.onnx; a cascade's low and high models are not "
                             "quantised yet: use quantize: none with cascade")
        return self

    @model_validator(mode="after")
    def _zero_steps_is_no_finetune(self) -> "Recipe":
        """``finetune.steps: 0`` means no fine-tune: the same recipe as ``finetune: null`` everywhere after."""
        if self.finetune is not None and self.finetune.steps == 0:
            self.finetune = None
        return self

    @model_serializer(mode="wrap")
    def _no_empty_plugins(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump leaves out ``plugins: []``, so a recipe without plugins dumps (and keys batch jobs) as before."""
        data = handler(self)
        if not self.plugins:
            data.pop("plugins", None)
        return data

    @property
    def model_steps(self) -> list[TransformConfig]:
        """The steps that make the converted model: ``steps``, or the cascade's low-effort steps."""
        return self.cascade.low if self.cascade is not None else self.steps


def format_validation_error(source: str, prefix: str, exc: ValidationError, model: type[BaseModel]) -> str:
    err = exc.errors()[0]
    loc = [prefix] if prefix else []
    loc += [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, err["loc"][:-1])
        allowed = ", ".join(f.alias or n for n, f in parent.model_fields.items()) if parent else "?"
        msg = f"unknown key (allowed: {allowed})"
    elif (item := re.match(r"Value error, item (\d+): (.*)", err["msg"], re.S)) and isinstance(err.get("input"), list):
        where += f".{item[1]}"  # a list validator's message about one item (a selector) names the item
        msg = item[2]
    else:
        msg = err["msg"]
        if "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    return f"{source}: {where}: {msg}" + (f" (and {more} more problems)" if more else "")


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` through nested fields."""
    current: Any = model
    for part in loc:
        fields = {f.alias or n: f for n, f in current.model_fields.items()}
        field = fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return None
    return current


def parse_recipe(data: Any, source: str, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; ``source`` names the file in error messages, ``base_dir`` is the folder its
    ``plugins:`` are relative to (default: the working directory). The plugins are imported first."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with 'steps' and settings, got {type(data).__name__}")
    if data.get("plugins") is not None:
        load_recipe_plugins(data["plugins"], Path.cwd() if base_dir is None else base_dir, source)
    steps = _parse_steps(data.get("steps", []), source, "steps")
    cascade = data.get("cascade")
    if isinstance(cascade, dict):
        cascade = dict(cascade)
        for key in ("low", "high"):
            if key in cascade and cascade[key] != "original":
                cascade[key] = _parse_steps(cascade[key], source, f"cascade.{key}")
        data = {**data, "cascade": cascade}
    try:
        recipe = Recipe.model_validate({**data, "steps": steps})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, "", exc, Recipe)) from None
    _check_stages(recipe, source)
    _check_token_distillation(recipe, source)
    return recipe


def _check_token_distillation(recipe: Recipe, source: str) -> None:
    """``finetune.distill.tokens_mse`` compares final tokens one to one: no step may change their number."""
    if recipe.finetune is None or recipe.finetune.distill.tokens_mse == 0:
        return
    merging = [s.transform for s in recipe.model_steps if not s.keeps_token_count]
    if merging:
        raise RecipeError(f"{source}: finetune.distill.tokens_mse: {merging[0]} changes the number of tokens, so "
                          "the final tokens cannot be compared with the original model's; set tokens_mse: 0")


def _check_stages(recipe: Recipe, source: str) -> None:
    """``finetune.stages`` names transforms of the steps, each in one non-empty group."""
    if recipe.finetune is None or recipe.finetune.stages is None:
        return
    used = [s.transform for s in recipe.model_steps]
    seen: set[str] = set()
    for i, group in enumerate(recipe.finetune.stages):
        if not group:
            raise RecipeError(f"{source}: finetune.stages.{i}: a stage names at least one transform")
        for name in group:
            if name not in used:
                raise RecipeError(f"{source}: finetune.stages.{i}: {name!r} is not a transform of the steps "
                                  f"(steps use: {', '.join(dict.fromkeys(used)) or 'none'})")
            if name in seen:
                raise RecipeError(f"{source}: finetune.stages.{i}: {name!r} is already in an earlier stage")
            seen.add(name)


def staged_steps(recipe: Recipe) -> list[list[int]]:
    """Indices of the steps applied by each fine-tune stage (empty without ``finetune.stages``)."""
    if recipe.finetune is None or not recipe.finetune.stages:
        return []
    steps = recipe.model_steps
    return [[i for i, s in enumerate(steps) if s.transform in group] for group in recipe.finetune.stages]


def _parse_steps(raw_steps: Any, source: str, where: str) -> list[TransformConfig]:
    """Validate a list of transform steps, each by the config class its ``transform:`` names."""
    if not isinstance(raw_steps, list):
        raise RecipeError(f"{source}: {where}: must be a list of transform steps")
    steps = []
    for i, step in enumerate(raw_steps):
        if not isinstance(step, dict) or "transform" not in step:
            raise RecipeError(f"{source}: {where}.{i}: each step is a mapping with a 'transform' key")
        transform = registry.get(str(step["transform"]))
        if transform is None:
            known = ", ".join(registry.available())
            raise RecipeError(
                f"{source}: {where}.{i}.transform: unknown transform {step['transform']!r} (known: {known}; a "
                "third-party transform comes from the recipe's `plugins:` or an installed plugin)")
        try:
            steps.append(transform.config.model_validate(step))
        except ValidationError as exc:
            raise RecipeError(format_validation_error(source, f"{where}.{i}", exc, transform.config)) from None
    return steps


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as YAML; list indices allowed: ``steps.0.rank=32``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip() or any(not p for p in parts):
            raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. finetune.steps=100")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise RecipeError(f"--set {item!r}: value is not valid YAML") from None
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: depth + 1], item, create=True)
        last = parts[-1]
        if isinstance(node, list):
            _child(node, last, parts, item, create=False)
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise RecipeError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping or list")
    return data


def _child(node: Any, part: str, path: list[str], item: str, create: bool) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise RecipeError(f"--set {item!r}: {'.'.join(path)}: no list item {part} (list has {len(node)})")
        return node[int(part)]
    if isinstance(node, dict):
        if node.get(part) is None and create:
            node[part] = {}
        return node[part]
    raise RecipeError(f"--set {item!r}: {'.'.join(path[:-1])} is not a mapping or list")


SHIPPED_PACKAGE = "vitcompress.recipes"


def _shipped_dir() -> Path:
    """Folder of the shipped recipes: the package ``vitcompress.recipes`` (the repo's top-level ``recipes/``,
    mapped in pyproject), or ``recipes/`` beside the package in a source checkout that is not installed."""
    try:
        return Path(str(resources.files(SHIPPED_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name → file of every recipe shipped with vitcompress, sorted by name."""
    return {path.stem: path for path in sorted(_shipped_dir().glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The first line of the recipe file's leading ``#`` comment: its one-line summary ('' when it has none)."""
    first = path.read_text().partition("\n")[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def resolve_recipe(spec: str | Path) -> Path:
    """The recipe file ``spec`` names: an existing path first (relative to the working directory), else a
    shipped recipe by name, with or without ``.yaml`` (``svd``, ``svd.yaml``)."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = shipped_recipes()
    if path.parent == Path("."):
        name = path.name.removesuffix(".yaml")
        if name in shipped:
            return shipped[name]
    raise RecipeError(f"recipe {spec} does not exist: not a file here, nor a shipped recipe "
                      f"(shipped: {', '.join(shipped) or 'none'})")


def read_recipe_file(path: Path) -> dict:
    """Parse the YAML of a recipe file into a mapping (errors name the file, line and column)."""
    data = read_yaml_file(path, "recipe")
    if data is None:
        raise RecipeError(f"recipe {path} is empty: a recipe lists `steps:` (see `vitcompress recipes`)")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file or shipped recipe (:func:`resolve_recipe`), after ``--set`` overrides."""
    path = resolve_recipe(path)
    data = read_recipe_file(path)
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping, got {type(data).__name__}")
        data = apply_overrides(data, overrides, str(path))
    return parse_recipe(data, str(path), path.parent)


def recipe_argument(recipe: str | Path | Recipe, overrides: list[str] | None = None) -> tuple[Recipe, str]:
    """The recipe a command was given and how its report names it: a :class:`Recipe` as it is ("(in memory)"), or
    a file or shipped name loaded with ``overrides`` (:func:`load_recipe`; its path as given)."""
    if isinstance(recipe, Recipe):
        return recipe, "(in memory)"
    return load_recipe(recipe, overrides), str(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the resolved recipe: every default filled in, so a run can be repeated exactly."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
