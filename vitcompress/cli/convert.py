"""The conversion commands: ``convert`` (with its ``--nproc`` launcher), ``plan``, ``profile`` and ``recipes``.

torch and the pipeline are imported inside the commands so that ``--help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from vitcompress.cli.common import RichProgress, console, error_line, progress_bars, source_options, user_errors
from vitcompress.cli.render import extra_tables, print_plan, profile_table, recipe_tables, report_table


@click.command()
@click.argument("model", required=False)
@source_options(model_arg_help="timm.create_model argument that changes the architecture, e.g. depth=2 "
                               "(with --random-init)")
@click.option("--labels", type=click.Path(path_type=Path),
              help="YAML/JSON file mapping --data's class folders to the model's class indices or names")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--force", is_flag=True, help="replace the output directory if it exists")
@click.option("--json", "as_json", is_flag=True, help="print report.json to stdout")
@click.option("--optimize-offline", type=click.Choice(["basic", "extended", "all"]),
              help="add model.opt.onnx, optimised by onnxruntime at LEVEL (beyond basic: --for-this-machine)")
@click.option("--for-this-machine", is_flag=True, help="allow offline levels tied to this machine's CPU (recorded)")
@click.option("--ort-format", is_flag=True, help="add model.ort, written by onnxruntime's ORT-format converter")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True, metavar="N",
              help="fine-tune in N processes (DDP) on this machine, started by torchrun's launcher")
@click.option("--resume", is_flag=True, help="continue an interrupted conversion into --out from its last "
              "fine-tune checkpoint (finetune.checkpoint_every)")
@click.option("--sensitivity", type=click.Path(path_type=Path), metavar="FILE",
              help="a `vitcompress sensitivity` result, kept in the bundle for report.html's block × step heat map")
def convert(model: str | None, recipe_path: Path, checkpoint: Path | None, data: str | None,
            overrides: tuple[str, ...], random_init: bool, model_arg_items: tuple[str, ...], labels: Path | None,
            out_dir: Path, force: bool, as_json: bool, optimize_offline: str | None, for_this_machine: bool,
            ort_format: bool, nproc: int, resume: bool, sensitivity: Path | None) -> None:
    """Convert MODEL (timm name, alias or Hugging Face checkpoint directory; default: the recipe's `model:`) with a
    recipe, export and validate it.

    Under torchrun (`torchrun --nproc-per-node N -m vitcompress convert ...`) every process fine-tunes its share
    of the global batch; rank 0 exports, validates and writes. `--nproc N` starts torchrun for you."""
    from vitcompress.models import check_model_args, parse_model_args

    with user_errors():
        model_args = parse_model_args(model_arg_items)
        check_model_args(model_args, checkpoint, random_init)
    if nproc > 1:
        _launch(nproc, model=model, recipe=recipe_path, out_dir=out_dir, overrides=list(overrides), force=force,
                resume=resume, weights=checkpoint, random_init=random_init, data=data, model_args=model_args)
    if model and checkpoint is None and not random_init:
        from vitcompress.models import check_pretrained_available

        with user_errors():  # before the pipeline's imports: offline fails in seconds
            check_pretrained_available(model)
    from vitcompress.api import convert as run_convert
    from vitcompress.context import DeployOptions
    from vitcompress.render import timings_line

    with user_errors(), progress_bars() as bar:
        report = run_convert(model, recipe_path, out_dir=out_dir, checkpoint=checkpoint, data=data, labels=labels,
                             overrides=list(overrides), force=force, random_init=random_init,
                             progress=RichProgress(bar), resume=resume, model_args=model_args, sensitivity=sensitivity,
                             deploy=DeployOptions(optimize_offline, for_this_machine, ort_format)).report
    if report is None:
        return  # a torchrun rank other than 0: it trained; rank 0 writes and reports
    if as_json:
        click.echo(report.dump_json())
    else:
        Console().print(report_table(report))
        for table in extra_tables(report):
            Console().print(table)
        if timings_line(report):
            console.print(f"time: {timings_line(report)}", soft_wrap=True, highlight=False)
        cascade = ", low.onnx, high.onnx, cascade.json" if report.cascade else ""
        console.print(f"wrote {out_dir}/: model.onnx, model.safetensors, recipe.resolved.yaml, report.json, "
                      f"report.md, predictions.npz{cascade}, and the deployment files (preprocess.json, labels.txt, "
                      f"golden/, inference.json, predict.py, requirements.txt, SHA256SUMS: vitcompress verify "
                      f"{out_dir})")
    if report.finetune and report.finetune.stopped:
        console.print(f"[bold yellow]fine-tune stopped early:[/] {report.finetune.stopped}")
    if report.failed_gates:
        console.print(f"[bold red]validation failed:[/] {', '.join(report.failed_gates)} (see {out_dir}/report.md)")
    if not as_json:
        console.print(f"report: {(out_dir / 'report.html').resolve()}", soft_wrap=True, highlight=False)
    if report.failed_gates:
        sys.exit(1)


def _launch(nproc: int, **options: Any) -> None:
    """``convert --nproc N``: check the command once, then run it (without ``--nproc``) in N processes through
    torch.distributed.run; exits with the run's code, printing the error line of the rank that failed first."""
    from vitcompress.errors import UsageError
    from vitcompress.training.launch import in_worker, launch

    with user_errors():
        if in_worker():
            raise UsageError("--nproc starts torchrun itself: under torchrun, leave --nproc out")
        from vitcompress.api import preflight

        preflight(options.pop("model"), options.pop("recipe"), world_size=nproc, **options)
    argv = click.get_current_context().obj["argv"]
    code, line = launch(nproc, _without_nproc(argv))
    if line:
        error_line(line)
    sys.exit(code)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


@click.command()
@click.argument("model", required=False)
@source_options(data_help="calibration images, only for steps that calibrate (as convert's --data)",
                set_help="override a recipe value, e.g. steps.0.rank=32",
                random_init_help="random weights: enough for params, MACs and export (not for ranks by energy or "
                                 "CKA skips)",
                model_arg_help="timm.create_model argument that changes the architecture, e.g. depth=2 "
                               "(with --random-init)")
@click.option("--calibration-images", type=click.IntRange(1), metavar="N",
              help="calibrate on at most N images  [default: 32, or the recipe's calibration.images when fewer]")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON to stdout")
def plan(model: str | None, recipe_path: Path, checkpoint: Path | None, data: str | None,
         overrides: tuple[str, ...], random_init: bool, model_arg_items: tuple[str, ...],
         calibration_images: int | None, as_json: bool) -> None:
    """Dry run: apply the recipe's steps to MODEL, count params and MACs per step, check the ONNX export.

    The speed-up counts an int8 MAC at its cost relative to a float MAC, timed here in onnxruntime per layer
    shape. No fine-tuning, nothing written. Exit code 1 when the result does not export."""
    from vitcompress.models import check_model_args, parse_model_args
    from vitcompress.planner import plan as run_plan

    with user_errors():
        model_args = parse_model_args(model_arg_items)
        check_model_args(model_args, checkpoint, random_init)
        budget = {"calibration_images": calibration_images} if calibration_images else {}
        result = run_plan(model, recipe_path, checkpoint=checkpoint, data=data, overrides=list(overrides),
                          random_init=random_init, model_args=model_args, progress=RichProgress(None), **budget)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        print_plan(result)
    if not result.export.exportable:
        sys.exit(1)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 4096))
@click.option("--runs", default=20, show_default=True, type=click.IntRange(1, 10_000), help="profiled runs")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, 1000), help="runs before them")
@click.option("--threads", type=click.IntRange(1, 256), help="ORT intra-op threads [default: as validated]")
@click.option("--baseline", type=click.Path(path_type=Path), help="another ONNX (e.g. the original) profiled alongside")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON to stdout")
def profile(bundle: Path, batch_size: int, runs: int, warmup: int, threads: int | None, baseline: Path | None,
            as_json: bool) -> None:
    """Per-block latency of a convert output BUNDLE's model.onnx in onnxruntime's profiler.

    Each node's time goes to its transformer block, the block's attn / mlp / norm / other sub-module and the
    recipe step that converted it (from the bundle's report.json); time outside the blocks has its own rows.
    """
    from vitcompress.profile import profile_bundle

    with user_errors():
        result = profile_bundle(bundle, baseline=baseline, batch_size=batch_size, runs=runs, warmup_runs=warmup,
                                threads=threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    Console().print(profile_table(bundle, result, batch_size, runs))


@click.command()
def recipes() -> None:
    """List the shipped recipes (usable by name: --recipe svd) and the transforms a recipe can use."""
    for table in recipe_tables():
        Console().print(table)
