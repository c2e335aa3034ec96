"""A Triton Inference Server model repository from a bundle (``vitcompress export triton``).

The configuration is Triton's own protobuf message (``tritonclient.grpc.model_config_pb2.ModelConfig``, from
the optional ``triton`` extra) written with ``google.protobuf.text_format``, so every field name and enum is
checked by protobuf rather than by string formatting. ``dims`` never hold the batch axis: with
``max_batch_size`` > 0 Triton adds it (a batch axis in ``dims`` is the classic misconfiguration), and a model
whose batch axis is fixed is refused unless ``max_batch_size`` is 0. A cascade bundle becomes two models
(``N-low``, ``N-high``) with a note on routing: Triton's ensembles are static graphs, so the entropy test runs
in the client (or a BLS model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from vitcompress.deploy.bundle import INFERENCE, LABELS, MODEL, cascade_models, check_checksums
from vitcompress.deploy.runtime import CASCADE_FILE, open_session
from vitcompress.errors import ModelError, OutputError, UsageError

CONFIG = "config.pbtxt"
ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
              "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(uint8)": "TYPE_UINT8",
              "tensor(int8)": "TYPE_INT8", "tensor(bool)": "TYPE_BOOL"}
KINDS = ("cpu", "gpu")


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise UsageError(f"export triton needs tritonclient: pip install 'vitcompress[triton]' ({exc})") from None
    return model_config_pb2


def model_config(onnx_path: Path, *, name: str, max_batch_size: int, instances: int, kind: str, threads: int,
                 preferred: list[int], label_output: str = "logits"):
    """The ``ModelConfig`` message of one ONNX model: inputs/outputs from the graph, batch axis left out."""
    mc = _model_config_pb2()
    session = open_session(onnx_path, 1)
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for tensor, add in [(t, config.input.add) for t in session.get_inputs()] + \
                       [(t, config.output.add) for t in session.get_outputs()]:
        shape = list(tensor.shape)
        if max_batch_size > 0:
            if isinstance(shape[0], int):
                raise UsageError(f"{onnx_path.name}: the batch axis of {tensor.name!r} is fixed at {shape[0]} "
                                 "(exported with export.dynamic_batch false): Triton cannot batch it; pass "
                                 "--max-batch-size 0 to serve it unbatched")
            shape = shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise ModelError(f"{onnx_path.name}: {tensor.name!r} has a dynamic axis past the batch axis: "
                             f"{tensor.shape}")
        entry = add(name=tensor.name, data_type=getattr(mc, ONNX_TYPES.get(tensor.type, "TYPE_INVALID")))
        if shape:
            entry.dims.extend(shape)
        else:  # a per-image scalar (the cascade's entropy): Triton wants dims [1], the model has none
            entry.dims.append(1)
            entry.reshape.SetInParent()
        if tensor.name == label_output:
            entry.label_filename = LABELS
    if max_batch_size > 0:
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = 100
    config.instance_group.add(count=instances, kind=getattr(mc.ModelInstanceGroup, f"KIND_{kind.upper()}"))
    config.parameters["intra_op_thread_count"].string_value = str(threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    warmup = config.model_warmup.add(name="random_input", batch_size=1)
    for tensor in config.input:
        warmup.inputs[tensor.name].data_type = tensor.data_type
        warmup.inputs[tensor.name].dims.extend(tensor.dims)
        warmup.inputs[tensor.name].random_data = True
    return config


def export_triton(bundle: str | Path, repo: str | Path, *, name: str | None = None, version: int = 1,
                  max_batch_size: int | None = None, instances: int = 1, kind: str = "cpu",
                  force: bool = False) -> list[Path]:
    """Write the bundle's model(s) into the Triton model repository ``repo``; returns the model directories.

    Each model directory is ``repo/<name>/`` with ``config.pbtxt``, ``<version>/model.onnx`` and
    ``labels.txt``. An existing model directory is replaced only with ``force``; other models in ``repo`` are
    left alone. ``max_batch_size`` defaults to the largest measured batch size, at least 8; the preferred
    batch sizes of the dynamic batcher are the measured ones above 1.
    """
    from google.protobuf import text_format

    bundle = Path(bundle)
    check_checksums(bundle)
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    name = name or bundle.resolve().name
    inference = json.loads((bundle / INFERENCE).read_text())
    measured = [int(b) for b in inference.get("batch_sizes", [])]
    batch = max([8, *measured]) if max_batch_size is None else max_batch_size
    preferred = sorted(b for b in measured if 1 < b <= batch)
    cascade = cascade_models(bundle)
    models = {f"{name}-low": cascade[0], f"{name}-high": cascade[1]} if cascade else {name: MODEL}
    repo = Path(repo)
    for model_name in models:
        target = repo / model_name
        if target.exists() and not force:
            raise OutputError(f"{target} exists: pass --force to replace that model directory")
        if target.exists() and not (target.is_dir() and ((target / CONFIG).is_file() or not any(target.iterdir()))):
            raise OutputError(f"{target} is not a Triton model directory (no {CONFIG}): --force does not replace it")
    written = []
    repo.mkdir(parents=True, exist_ok=True)
    for model_name, file in models.items():
        config = model_config(bundle / file, name=model_name, max_batch_size=batch, instances=instances, kind=kind,
                              threads=int(inference.get("intra_op_threads", 1)), preferred=preferred)
        work = Path(tempfile.mkdtemp(prefix=f".{model_name}.partial-", dir=repo))
        try:
            (work / str(version)).mkdir()
            shutil.copyfile(bundle / file, work / str(version) / MODEL)
            shutil.copyfile(bundle / LABELS, work / LABELS)
            (work / CONFIG).write_text(text_format.MessageToString(config))
            if cascade:
                (work / "cascade.md").write_text(routing_note(bundle, name))
            _replace(work, repo / model_name)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        written.append(repo / model_name)
    return written


def _replace(work: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        work.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(target)


def routing_note(bundle: Path, name: str) -> str:
    """How a client runs the cascade with the two Triton models."""
    spec = json.loads((bundle / CASCADE_FILE).read_text())
    threshold = float(spec["threshold"])
    return (f"# Cascade {name}: low → high effort\n\n"
            f"Send every image to `{name}-low`. It returns `logits` and `entropy` (Shannon entropy, nats, of its "
            f"softmax). Keep its logits where `entropy <= {threshold!r}`; send the other images to `{name}-high` "
            f"and use its logits. The threshold was calibrated so that a fraction "
            f"{spec.get('low_effort_fraction', 'n/a')} of the validation images exits at the low model "
            f"(vitcompress.deploy.runtime.Cascade does the same).\n")

