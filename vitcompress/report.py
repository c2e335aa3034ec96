"""The conversion report: a pydantic model with a ``schema_version``, dumped as ``report.json``.

The stages assign typed sections to ``RunContext.report`` (a :class:`Sections`, validated on every assignment, so
the schema is enforced where a section is made); the report stage turns it into :class:`Report` (:func:`build`)
and writes ``report.json`` from it. Readers (the CLI, ``report.md``, the bench) load it with :meth:`Report.load`
and use attributes, e.g. ``report.validation.models["converted"].latency[1].p50_ms`` (batch sizes are ``int`` keys in
Python; ``report.json`` writes them as ``"b1"``).

A leaf module: pydantic and the standard library only (no torch), so reading a report is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

SCHEMA_VERSION = 1


def _batch_size(key: object) -> object:
    """``"b8"`` (a batch size as ``report.json`` writes it) → 8; anything else is left to int validation."""
    return int(key[1:]) if isinstance(key, str) and key[:1] == "b" and key[1:].isdigit() else key


#: A batch size: an ``int`` inside the program, ``"b8"`` in ``report.json`` (and in ``model_dump()``).
BatchSize = Annotated[int, BeforeValidator(_batch_size), PlainSerializer(lambda batch: f"b{batch}", return_type=str)]
V = TypeVar("V")
#: Values per batch size.
ByBatch = dict[BatchSize, V]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelInfo(_Section):
    """The original model: its name, where its weights came from, and which input decided the model."""

    name: str
    weights: str
    input_size: list[int]
    source: Literal["argument", "recipe"] = Field(
        description="argument: the model (name or module) given to convert; recipe: the recipe's `model:`")
    model_args: Optional[dict[str, Any]] = Field(
        None, description="timm.create_model arguments that changed the architecture (random init only), e.g. "
                          "{depth: 2}: a shallow copy (batch --smoke)")


class DataSplit(_Section):
    """How the train images (calibration, fine-tune) and the validation images were kept apart."""

    kind: Literal["held-out", "directories", "built-in"] = Field(
        description="held-out: one image directory split (seeded, stratified by class folder); directories: "
                    "DIR/train and DIR/val; built-in: the dataset's own split (Fashion-MNIST train/test, synthetic)")
    seed: Optional[int] = None
    holdout_fraction: Optional[float] = None
    held_out_images: Optional[int] = Field(None, description="the held-out part before validate.images limits it")
    per_class: Optional[dict[str, tuple[int, int]]] = Field(
        None, description="class folder ('' for unlabelled images) → [train, held-out] images")


class DataInfo(_Section):
    name: str
    train_images: int
    val_images: int
    labelled: bool
    classes: Optional[str] = Field(None, description="how class folders were matched to the model's classes")
    split: Optional[DataSplit] = Field(None, description="how train and validation images were separated "
                                                         "(absent for in-memory datasets and older reports)")


class Step(_Section):
    """What one recipe step converted; ``details`` holds transform-specific facts (e.g. CKA rounds)."""

    step: int
    transform: str
    modules: list[str]
    params_before: int
    params_after: int
    details: Optional[dict[str, Any]] = None
    seconds: Optional[float] = Field(None, description="wall seconds of the step, its calibration included "
                                     "(older reports: None)")
    calibration_seconds: Optional[float] = Field(None, description="wall seconds of the step's passes over the "
                                                 "calibration images (forwards and statistics); 0: none")


class FinetuneRun(_Section):
    """One distillation run: steps done of the budget, losses, speed, and why it stopped early (if it did)."""

    steps_done: int
    steps_budget: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    seconds: float
    images_per_second: float
    stopped: Optional[str]
    device: str
    world_size: int = Field(1, description="training processes (torchrun); images_per_second is their sum")
    per_rank_batch: Optional[int] = Field(None, description="images per process per step (the global batch / "
                                          "world_size)")
    backend: Optional[str] = Field(None, description="torch.distributed backend (gloo, nccl); None: one process")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    workers: Optional[int] = Field(None, description="DataLoader worker processes per rank")
    skipped_images: int = Field(0, description="unreadable training images left out of their batch (warned)")
    resumed_from_step: Optional[int] = Field(None, description="the checkpoint step a --resume continued from")


class FinetuneStageRun(FinetuneRun):
    transforms: list[str]


class Finetune(FinetuneRun):
    """The whole fine-tune; with ``finetune.stages``, the sum of the stages and each stage's run."""

    stages: Optional[list[FinetuneStageRun]] = None


class MoEDispatch(_Section):
    """The MoE export form chosen by measurement (``dispatch: auto``) and the p50 ms of each form per batch."""

    layers: int
    chosen: str
    gather_over_where: float
    runs: int
    latency: dict[str, ByBatch[float]] = Field(description="p50 ms per export form and batch size")


class Quantization(_Section):
    """The int8 form of model.onnx (``export.quantize``): onnxruntime.quantization on the float32 export."""

    mode: Literal["dynamic", "static"]
    per_channel: bool
    nodes: int = Field(description="float MatMul/Gemm/Conv nodes of the float32 graph (what was quantised)")
    fp32_onnx_bytes: int
    calibration: Optional[str] = Field(None, description="static: the calibration method of the ranges")
    activations: Optional[str] = Field(None, description="static: the activations' int8 type")
    calibration_images: Optional[int] = None
    quantised_outputs: Optional[bool] = Field(None, description="static: the MatMul/Gemm outputs were quantised "
                                              "too (false: float32 outputs, onnxruntime fuses every layer)")


class Export(_Section):
    opset: int
    dynamic_batch: bool
    checked_batches: list[int]
    onnx_bytes: int
    moe_dispatch: Optional[MoEDispatch] = None
    quantize: Optional[Quantization] = None


class Latency(_Section):
    """:class:`vitcompress.deploy.runtime.Timing` of one model at one batch size; spread = (p90 − p10) / p50."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    spread: float
    runs: int


class Parity(_Section):
    """torch vs onnxruntime logits of the same model on the first validation images."""

    max_abs_diff: float
    top1_agreement: float
    images: int
    onnx: str = Field("float32", description="what ran in onnxruntime: float32, or the int8 model (e.g. 'int8 "
                      "static') against the float32 torch model")


class ModelMetrics(_Section):
    params: int
    macs: int
    top1: Optional[float]
    latency: ByBatch[Latency] = Field(description="per batch size ('b1' in JSON, 1 in Python)")
    parity: Parity
    agreement: float = Field(description="top-1 agreement with the original model in onnxruntime")


class Gate(_Section):
    gate: str
    limit: float
    value: Optional[float]
    passed: Optional[bool] = Field(description="None: skipped (``note`` says why)")
    note: Optional[str] = None


class Validation(_Section):
    images: int
    threads: int
    models: dict[str, ModelMetrics] = Field(description="'original' and 'converted'")
    gates: list[Gate]
    expert_shares: Optional[dict[str, Any]] = Field(
        None, description="MoE models: share of tokens per expert, overall and per layer")


class ExpectedCost(_Section):
    cascade: float
    original: float
    speedup: float


class OperatingPoint(_Section):
    low_effort_fraction: float
    threshold: float
    early_fraction: float
    top1: Optional[float]
    expected_ms: ByBatch[ExpectedCost]


class CascadeHigh(_Section):
    """The high-effort model: 'original', or the steps applied to it and their fine-tune."""

    steps: Union[Literal["original"], list[Step]]
    finetune: Optional[Finetune]


class Cascade(_Section):
    low_effort_fraction: float
    threshold: float
    early_fraction: float
    images: int
    top1: Optional[float]
    top1_low: Optional[float]
    top1_high: Optional[float]
    expected_ms: ByBatch[ExpectedCost]
    latency: dict[str, ByBatch[Latency]]
    high: CascadeHigh
    sweep: list[OperatingPoint]


class Rung(_Section):
    """One rung of the accuracy ladder: one model on the ladder's held-out images, or why the run has no such model."""

    name: Literal["original", "transformed", "finetuned", "onnx_fp32", "quantized"]
    label: str = Field(description="what the rung is, for people, e.g. 'fine-tuned (torch)'")
    runtime: Literal["torch", "onnxruntime"]
    skipped: Optional[str] = Field(None, description="why the run has no such model (the other fields are then None)")
    images: Optional[int] = None
    top1: Optional[float] = Field(None, description="top-1 (%) on the labelled images; None without labels")
    agreement: Optional[float] = Field(None, description="share of images whose top-1 equals the original (torch)'s")
    logit_gap: Optional[float] = Field(None, description="mean |logits − the original (torch)'s logits|")
    seconds: Optional[float] = Field(None, description="the rung's cost: its pass over the images")


class Ladder(_Section):
    """Where accuracy went: the same first held-out images through each model of the run, in order."""

    images: int = Field(description="the rungs' image budget (validate.ladder_images) met by the held-out images")
    rungs: list[Rung]


class EndToEnd(_Section):
    """Latency per image from the image file: decode, resize and normalise (the bundle's own preprocessing), then
    model.onnx at batch 1; medians over ``samples`` timed images."""

    samples: int
    preprocess_ms: float
    model_ms: float
    total_ms: float
    model_share: float = Field(description="model_ms / total_ms")


class Shown(_Section):
    """One disagreement the page shows: the validation image's position, its thumbnail and where it came from."""

    position: int
    thumbnail: str = Field(description="the PNG in the bundle, as the model saw the image")
    source: str = Field(description="the image file (relative to --data) or 'validation image N'")


class Explain(_Section):
    """What ``report.html`` shows besides the validation: the ladder, the end-to-end latency and the per-image
    top-k file (``predictions.npz``, read by ``vitcompress report``)."""

    ladder: Optional[Ladder] = Field(None, description="None: validate.ladder_images is 0")
    end_to_end: Optional[EndToEnd] = Field(None, description="None: the validation images have no image files "
                                           "and are not whole grey levels")
    predictions: str = Field(description="the bundle file with each validation image's top-k of both models")
    top_k: int
    disagreements: int = Field(description="validation images whose top-1 differs between original and converted")
    shown: list[Shown] = Field(description="the first disagreements (at most 16), with their thumbnails")
    sensitivity: Optional[str] = Field(None, description="sensitivity.json copied into the bundle (convert "
                                       "--sensitivity), the page's block × step heat map")


class Remeasured(_Section):
    """Latency measured again on another machine without converting again (``vitcompress batch``)."""

    date: str
    reason: str = Field(description="what changed, e.g. 'machine changed (threads 1 → 2)'")
    converted_on: str = Field(description="the machine the conversion (and the earlier timings) ran on")
    converted_date: str


class PartTime(_Section):
    """A named part of a stage and its wall seconds."""

    name: str
    seconds: float


class StageTime(_Section):
    """One stage's wall seconds, with those of its named parts (disjoint; their sum is at most the stage's)."""

    stage: str = Field(description="the stage (vitcompress.api.STAGES): load, transform, finetune, export, "
                                   "validate, ladder, cascade, profile, report, bundle, page")
    seconds: float
    parts: list[PartTime] = Field(default_factory=list, description="e.g. validate: accuracy, parity, latency, "
                                  "costs; transform: the steps (each in steps[].seconds) and the ladder's pass")


class Timings(_Section):
    """Where the conversion's wall time went, stage by stage (this process; rank 0 of a torchrun job)."""

    seconds: float = Field(description="wall seconds from the first stage to the end of the last")
    stages: list[StageTime]


class Report(_Section):
    """Everything one ``convert`` measured; ``report.json`` is :meth:`dump_json` of it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    recipe: str = Field(description="the recipe file, or '(in memory)'")
    date: str
    machine: str
    versions: dict[str, str]
    model: ModelInfo
    data: DataInfo
    steps: list[Step]
    finetune: Optional[Finetune]
    export: Export
    validation: Validation
    cascade: Optional[Cascade] = None
    profile: Optional[dict[str, Any]] = Field(None, description="per-block onnxruntime profile (vitcompress.profile)")
    remeasured: Optional[Remeasured] = Field(None, description="set when the latency fields (and machine) are "
                                             "from a later re-measurement of the same converted model")
    explain: Optional[Explain] = Field(None, description="the ladder and what report.html shows (older reports: None)")
    timings: Optional[Timings] = Field(None, description="wall seconds per stage (older reports: None)")
    failed_gates: list[str]

    def dump_json(self) -> str:
        """The text of ``report.json``."""
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read and validate a ``report.json`` (or a convert output directory holding one).

        Args:
            path: the ``report.json`` file, or the directory ``convert`` wrote it to.

        Raises:
            pydantic.ValidationError: the file does not follow this schema version.
        """
        path = Path(path)
        return cls.model_validate_json((path / "report.json" if path.is_dir() else path).read_text())


class Sections(_Section):
    """The report while a conversion makes it: each stage assigns its typed section (validated on assignment);
    :func:`build` checks that every required one was assigned."""

    recipe: Optional[str] = None
    date: Optional[str] = None
    machine: Optional[str] = None
    versions: Optional[dict[str, str]] = None
    model: Optional[ModelInfo] = None
    data: Optional[DataInfo] = None
    steps: list[Step] = Field(default_factory=list)
    finetune: Optional[Finetune] = None
    export: Optional[Export] = None
    validation: Optional[Validation] = None
    cascade: Optional[Cascade] = None
    profile: Optional[dict[str, Any]] = None
    remeasured: Optional[Remeasured] = None
    explain: Optional[Explain] = None
    timings: Optional[Timings] = None

    @classmethod
    def of(cls, report: Report) -> "Sections":
        """The sections of a finished report (to re-measure and rebuild it)."""
        return cls(**{name: getattr(report, name) for name in cls.model_fields})


def build(sections: Sections) -> Report:
    """The finished :class:`Report` of ``sections``, with the names of the gates that failed. Only the sections
    that were assigned are passed on, so one that its stage never assigned is "Field required" (a stage that ran
    and found nothing to report, e.g. no fine-tune, assigns None)."""
    failed = [g.gate for g in sections.validation.gates if g.passed is False] if sections.validation else []
    assigned = {name: getattr(sections, name) for name in sections.model_fields_set}
    return Report(**assigned, failed_gates=failed)
