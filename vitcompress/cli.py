"""Command line: a thin click + rich layer over :mod:`vitcompress.api`.

torch and the pipeline are imported inside the commands so that ``--help`` answers at once. Every
:class:`~vitcompress.errors.VitCompressError` becomes one ``error:`` line and its exit code (2 for bad input,
1 for a failed validation gate); an unexpected exception is one line naming a traceback log and exit code 70.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from vitcompress.report import Report

console = Console(stderr=True)
#: Exit code of an unexpected exception (sysexits' EX_SOFTWARE): not 1 (a failed gate), not 2 (bad input).
CRASH_EXIT_CODE = 70
RECIPE_HELP = "recipe YAML file, or a shipped recipe by name (e.g. svd; list: vitcompress recipes)"


class RichProgress:
    """The library's progress interface drawn with rich: one line per stage, a live bar per long task.

    Without a terminal (CI logs, pipes) there are no bars, only the stage lines and one line per finished task.
    """

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.last_info: dict[str, str] = {}

    def stage(self, name: str, description: str) -> None:
        console.print(f"[bold cyan]{name:>9}[/] {escape(description)}", highlight=False)

    def start(self, task: str, total: int) -> None:
        if self.progress is not None:
            self.tasks[task] = self.progress.add_task(task, total=total, info="")

    def advance(self, task: str, amount: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k.replace('_', '/')} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in fields.items())
        self.last_info[task] = info
        if self.progress is not None:
            self.progress.update(self.tasks[task], advance=amount, info=info)

    def finish(self, task: str) -> None:
        if self.progress is not None:
            self.progress.remove_task(self.tasks.pop(task))
        if self.last_info.get(task):
            console.print(f"{'':>9} {task} done: {self.last_info.pop(task)}", highlight=False)


def _error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _crash_log(exc: BaseException) -> Path:
    """Write the full traceback of an unexpected exception to a log file; returns its path."""
    path = Path(tempfile.gettempdir()) / f"vitcompress-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread, so the library's cleanup (``finally``) runs as for Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def user_errors():
    """Turn every way a command can end badly into one ``error:`` line and a distinct exit code.

    A :class:`VitCompressError` exits with its own code (2 bad input, 1 failed gate); Ctrl-C with 130 and
    SIGTERM with 143, after the library has cleaned up; any other exception is a crash: one line naming a log
    file with the full traceback, exit code :data:`CRASH_EXIT_CODE`, so CI can tell a crash from a failed gate.
    """
    from vitcompress.errors import VitCompressError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except VitCompressError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); nothing was written", 130, quiet_in_worker=True)
    except Terminated:
        _fail("terminated (SIGTERM); nothing was written", 143, quiet_in_worker=True)
    except Exception as exc:
        from vitcompress.training.launch import is_collective_failure

        detail = (str(exc).strip().splitlines() or [""])[0]
        _fail(f"internal error: {type(exc).__name__}: {detail} (full traceback in {_crash_log(exc)}; "
              "please report it)", CRASH_EXIT_CODE, secondary=is_collective_failure(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int, secondary: bool = False, quiet_in_worker: bool = False) -> None:
    """Print the error line and exit with ``code``. In a torchrun worker the line names the rank and goes to
    torchrun's error file too; under ``convert --nproc`` the launcher prints it (once, for the rank that failed
    first), and a worker stopped by a signal (torchrun stops them all when one fails) prints nothing."""
    from vitcompress.training.launch import LAUNCHED_ENV, in_worker, record_failure, worker_rank

    if in_worker():
        if quiet_in_worker:
            sys.exit(code)
        message = f"rank {worker_rank()}: {message}"
        record_failure(message, secondary, code)
        if os.environ.get(LAUNCHED_ENV):
            sys.exit(code)
    _error_line(message)
    sys.exit(code)


def _report_table(report: Report) -> Table:
    from vitcompress.render import side_by_side_rows

    table = Table(title=f"{report.model.name}: original vs converted (onnxruntime CPU, "
                        f"{report.validation.threads} threads)")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    for row in side_by_side_rows(report):
        table.add_row(*row)
    return table


def _extra_tables(report: Report) -> list[Table]:
    """CKA scores of attention_skip steps and the cascade's operating points, when the run has them."""
    from vitcompress.render import cascade_rows, cka_rows

    tables = []
    if cka_rows(report):
        table = Table(title="attention_skip: linear CKA(block input, attention output), first round")
        for column in ("block", "CKA", "skipped in round"):
            table.add_column(column, justify="right")
        for row in cka_rows(report):
            table.add_row(*row)
        tables.append(table)
    if report.cascade:
        c = report.cascade
        table = Table(title=f"cascade: low → high effort by entropy (threshold {c.threshold:.4g} at "
                            f"fraction {c.low_effort_fraction:g})")
        for column in ("low_effort_fraction", "exit early", "top-1 (%)", "expected latency / image"):
            table.add_column(column, justify="right")
        for row in cascade_rows(report):
            table.add_row(*row)
        tables.append(table)
    return tables


def _print_plan(result: dict) -> None:
    """The plan's table (one row per step), the modules each step matched, the export check and the times."""
    from vitcompress.planner import compact_names, export_line, plan_rows

    out = Console()
    table = Table(title=f"plan: {result['model']['name']} with {result['recipe']}", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    table.add_column("step", no_wrap=True)
    for column in ("params (M)", "MACs (M)", "speed-up", "total", "s"):
        table.add_column(column, justify="right")
    for row in plan_rows(result):
        table.add_row(*row)
    out.print(table)
    for step in result["steps"]:
        out.print(f"step {step['step']} {step['transform']} matched {step['matched']}: "
                  f"{escape(', '.join(compact_names(step['modules'])))}", highlight=False)
    original, final = result["original"], result["final"]
    out.print(f"weights: {escape(result['model']['weights'])}", highlight=False)
    out.print(f"predicted speed-up: {final['speedup']:.2f}× (int8 MACs at their measured onnxruntime cost; MACs alone "
              f"{final['mac_speedup']:.2f}×); params {original['params'] / 1e6:.2f} → {final['params'] / 1e6:.2f} M",
              highlight=False)
    if result["calibration"]:
        cal = result["calibration"]
        out.print(f"calibrated on {cal['images']} of the recipe's {cal['recipe_images']} images "
                  f"({escape(cal['data'])}; --calibration-images N)", highlight=False)
    if result["planned"] != "steps":
        out.print(f"planned: {result['planned']}", highlight=False)
    out.print(escape(export_line(result["export"])), highlight=False)
    seconds = result["seconds"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total" and v is not None)
    out.print(f"plan took {seconds['total']:.1f} s ({parts})", highlight=False)


class OneLineErrors(click.Group):
    """A click group whose usage errors (unknown option, bad number, missing argument) are one ``error:`` line
    and exit code 2, like every other bad input, instead of click's three-line usage block."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        # the command line as given, for `convert --nproc` to start the same command in every process
        kwargs["obj"] = {"argv": list(args) if args is not None else sys.argv[1:]}
        try:
            code = super().main(args, *rest, **kwargs)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            _error_line(exc.format_message() + (f" (see '{context.command_path} --help')" if context else ""))
            sys.exit(exc.exit_code)
        except click.Abort:
            _error_line("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="log each converted module")
def main(verbose: bool) -> None:
    """vitcompress: make a pretrained Vision Transformer faster, export it to ONNX, prove it still agrees."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


@main.command()
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path), help=RECIPE_HELP)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="weights: .safetensors, .pth or .pt")
@click.option("--data", help="fmnist, synthetic, or an image directory (DIR/<class>/*, or DIR/train + DIR/val)")
@click.option("--labels", type=click.Path(path_type=Path),
              help="YAML/JSON file mapping --data's class folders to the model's class indices or names")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe value, e.g. finetune.steps=50")
@click.option("--force", is_flag=True, help="replace the output directory if it exists")
@click.option("--random-init", is_flag=True, help="random weights, for latency-only work (stated in the report)")
@click.option("--json", "as_json", is_flag=True, help="print report.json to stdout")
@click.option("--optimize-offline", type=click.Choice(["basic", "extended", "all"]),
              help="add model.opt.onnx, optimised by onnxruntime at LEVEL (beyond basic: --for-this-machine)")
@click.option("--for-this-machine", is_flag=True, help="allow offline levels tied to this machine's CPU (recorded)")
@click.option("--ort-format", is_flag=True, help="add model.ort, written by onnxruntime's ORT-format converter")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True, metavar="N",
              help="fine-tune in N processes (DDP) on this machine, started by torchrun's launcher")
@click.option("--resume", is_flag=True, help="continue an interrupted conversion into --out from its last "
              "fine-tune checkpoint (finetune.checkpoint_every)")
@click.option("--model-arg", "model_arg_items", multiple=True, metavar="NAME=VALUE",
              help="timm.create_model argument that changes the architecture, e.g. depth=2 (with --random-init)")
def convert(model, recipe_path, checkpoint, data, labels, out_dir, overrides, force, random_init, as_json,
            optimize_offline, for_this_machine, ort_format, nproc, resume, model_arg_items) -> None:
    """Convert MODEL (timm name or alias; default: the recipe's `model:`) with a recipe, export and validate it.

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

    columns = (TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    bars = Progress(*columns, console=console, transient=True) if console.is_terminal else contextlib.nullcontext()
    with user_errors(), bars as bar:
        report = run_convert(model, recipe_path, out_dir=out_dir, checkpoint=checkpoint, data=data, labels=labels,
                             overrides=list(overrides), force=force, random_init=random_init,
                             progress=RichProgress(bar), resume=resume, model_args=model_args,
                             deploy=DeployOptions(optimize_offline, for_this_machine, ort_format)).report
    if report is None:
        return  # a torchrun rank other than 0: it trained; rank 0 writes and reports
    if as_json:
        click.echo(report.dump_json())
    else:
        Console().print(_report_table(report))
        for table in _extra_tables(report):
            Console().print(table)
        cascade = ", low.onnx, high.onnx, cascade.json" if report.cascade else ""
        console.print(f"wrote {out_dir}/: model.onnx, model.safetensors, recipe.resolved.yaml, report.json, "
                      f"report.md{cascade}, and the deployment files (preprocess.json, labels.txt, golden/, "
                      f"inference.json, predict.py, requirements.txt, SHA256SUMS: vitcompress verify {out_dir})")
    if report.finetune and report.finetune.stopped:
        console.print(f"[bold yellow]fine-tune stopped early:[/] {report.finetune.stopped}")
    if report.failed_gates:
        console.print(f"[bold red]validation failed:[/] {', '.join(report.failed_gates)} (see {out_dir}/report.md)")
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
        _error_line(line)
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


@main.command()
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path), help=RECIPE_HELP)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="weights: .safetensors, .pth or .pt")
@click.option("--data", help="calibration images, only for steps that calibrate (as convert's --data)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe value, e.g. steps.0.rank=32")
@click.option("--random-init", is_flag=True,
              help="random weights: enough for params, MACs and export (not for ranks by energy or CKA skips)")
@click.option("--calibration-images", type=click.IntRange(1), metavar="N",
              help="calibrate on at most N images  [default: 32, or the recipe's calibration.images when fewer]")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON to stdout")
def plan(model, recipe_path, checkpoint, data, overrides, random_init, calibration_images, as_json) -> None:
    """Dry run: apply the recipe's steps to MODEL, count params and MACs per step, check the ONNX export.

    The speed-up counts an int8 MAC at its cost relative to a float MAC, timed here in onnxruntime per layer
    shape. No fine-tuning, nothing written. Exit code 1 when the result does not export."""
    from vitcompress.planner import plan as run_plan

    with user_errors():
        budget = {"calibration_images": calibration_images} if calibration_images else {}
        result = run_plan(model, recipe_path, checkpoint=checkpoint, data=data, overrides=list(overrides),
                          random_init=random_init, progress=RichProgress(None), **budget)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_plan(result)
    if not result["export"]["exportable"]:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 4096))
@click.option("--runs", default=20, show_default=True, type=click.IntRange(1, 10_000), help="profiled runs")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, 1000), help="runs before them")
@click.option("--threads", type=click.IntRange(1, 256), help="ORT intra-op threads [default: as validated]")
@click.option("--baseline", type=click.Path(path_type=Path), help="another ONNX (e.g. the original) profiled alongside")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON to stdout")
def profile(bundle, batch_size, runs, warmup, threads, baseline, as_json) -> None:
    """Per-block latency of a convert output BUNDLE's model.onnx in onnxruntime's profiler.

    Each node's time goes to its transformer block, the block's attn / mlp / norm / other sub-module and the
    recipe step that converted it (from the bundle's report.json); time outside the blocks has its own rows.
    """
    from vitcompress.profile import block_columns, block_rows, parts_line, profile_bundle

    with user_errors():
        result = profile_bundle(bundle, baseline=baseline, batch_size=batch_size, runs=runs, warmup_runs=warmup,
                                threads=threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    converted, reference = result["converted"], result["baseline"]
    table = Table(title=f"{escape(str(bundle))}: ms per run by block (onnxruntime profiler, batch {batch_size}, "
                        f"median of {runs} runs, {converted['threads']} threads)",
                  caption=f"{parts_line(converted, reference)}\nnode kernels {converted['node_ms']:.2f} ms of a "
                          f"{converted['run_ms']:.2f} ms profiled run; {converted['unmapped_nodes']} of "
                          f"{converted['nodes']} nodes unmapped")
    for column in block_columns("baseline" if reference else None):
        text = column in ("block", "recipe steps", "top op types")
        table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for row in block_rows(converted, reference):
        table.add_row(*row, end_section=row[0] == "unmapped")
    Console().print(table)


@main.command()
def recipes() -> None:
    """List the shipped recipes (usable by name: --recipe svd) and the transforms a recipe can use."""
    from vitcompress.recipe import recipe_description, shipped_recipes
    from vitcompress.transforms import registry

    shipped = Table(title="[bold]shipped recipes[/] (--recipe NAME; a file of that name here comes first)",
                    title_justify="left", show_edge=False)
    shipped.add_column("name", no_wrap=True)
    shipped.add_column("description")
    for name, path in shipped_recipes().items():
        shipped.add_row(name, escape(recipe_description(path)))
    Console().print(shipped)

    for name, transform in registry.available().items():
        table = Table(title=f"[bold]{name}[/]: {transform.doc}", title_justify="left", show_edge=False)
        table.add_column("parameter")
        table.add_column("type / default")
        table.add_column("meaning")
        for field_name, field in transform.config.model_fields.items():
            if field_name == "transform":
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            annotation = field.annotation
            annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
            table.add_row(field_name, f"{annotation} = {default}", field.description or "")
        Console().print(table)


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(1), metavar="K",
              help="classes per image, at most the model's class count [default: 5, or all when fewer]")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096), metavar="B",
              help="images per onnxruntime run")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256), help="ORT intra-op threads")
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="onnxruntime execution provider")
@click.option("--cascade", "cascade_dir", type=click.Path(path_type=Path), hidden=True,
              help="(older form) a cascade directory: every argument is an image; --json prints one document")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per image (JSON lines) to stdout")
def predict(bundle, images, top_k, batch_size, threads, provider, cascade_dir, as_json) -> None:
    """Classify IMAGES (files or directories) with a convert output BUNDLE, onnxruntime only (no torch).

    BUNDLE is a convert output directory (its cascade when it holds cascade.json) or one .onnx/.ort file.
    Prints each image's top-k labels and probabilities as a table, or JSON lines with --json."""
    from vitcompress.deploy.predict import BundlePredictor

    if cascade_dir is not None:
        bundle, images = cascade_dir, tuple(a for a in (bundle, *images) if a is not None)
    if bundle is None or not images:
        raise click.UsageError("give a BUNDLE and at least one IMAGE or directory of images")
    with user_errors():
        predictor = BundlePredictor(bundle, threads, provider, cascade_only=cascade_dir is not None)
    top_k = min(5, predictor.classes) if top_k is None else top_k
    if top_k > predictor.classes:
        raise click.BadParameter(f"{top_k} is out of range: the model has {predictor.classes} classes "
                                 f"(1–{predictor.classes})", param_hint="'--top-k'")
    with user_errors():
        rows = predictor.predict(images, batch_size=batch_size, top_k=top_k)
    if as_json and cascade_dir is not None:  # the older form's JSON document, kept for its users
        click.echo(json.dumps({"threshold": predictor.cascade.threshold, "predictions": [
            {"image": r["path"], "class": r["classes"][0], "name": r["labels"][0], "probability": r["probabilities"][0],
             "entropy": r["entropy"], "model": r["model"]} for r in rows]}, indent=2))
        return
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    cascade = predictor.cascade is not None
    title = f"{escape(str(bundle))}: top-{top_k}" + (
        f" (cascade: exit at the low model when entropy ≤ {predictor.cascade.threshold:.4g})" if cascade else "")
    table = Table(title=title)
    for column in ("image", "top-1", "p", f"top-{top_k}" if top_k > 1 else None, "model" if cascade else None):
        if column:
            table.add_column(column, justify="right" if column == "p" else "left")
    for r in rows:
        cells = [escape(r["path"]), escape(r["labels"][0]), f"{r['probabilities'][0]:.3f}"]
        if top_k > 1:
            cells.append(escape(", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"][1:], r["probabilities"][1:]))))
        if cascade:
            cells.append(f"{r['model']} ({r['entropy']:.3f})")
        table.add_row(*cells)
    Console().print(table)
    if cascade:
        early = sum(r["model"] == "low" for r in rows)
        console.print(f"{early}/{len(rows)} images exited at the low-effort model")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="onnxruntime execution provider")
@click.option("--json", "as_json", is_flag=True, help="print the checks as JSON to stdout")
def verify(bundle, provider, as_json) -> None:
    """Check a convert output BUNDLE with onnxruntime alone: SHA256SUMS, the golden logits of every model, the
    preprocessing of the stored source images. Exit 0 ok, 1 a mismatch (says by how much), 2 not a bundle or
    corrupt."""
    from vitcompress.deploy.bundle import verify as run_verify

    with user_errors():
        result = run_verify(bundle, provider)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for check in result.checks:
            mark = "[green]ok[/]  " if check.passed else "[bold red]FAIL[/]"
            Console().print(f"{mark} {escape(check.name)}: {escape(check.detail)}", highlight=False)
        verdict = "[green]bundle verified[/]" if result.ok else "[bold red]bundle does not match:[/] " + ", ".join(
            c.name for c in result.checks if not c.passed)
        console.print(f"{verdict} ({result.seconds:.2f} s, {provider})", highlight=False)
    if not result.ok:
        sys.exit(1)


@main.group(cls=click.Group)
def export() -> None:
    """Deployment forms of a convert output bundle: a Triton model repository, offline-optimised models."""


@export.command("triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", required=True, type=click.Path(path_type=Path), help="the Triton model repository")
@click.option("--name", help="model name  [default: the bundle directory's name]")
@click.option("--version", default=1, show_default=True, type=click.IntRange(1), help="model version directory")
@click.option("--max-batch-size", type=click.IntRange(0), metavar="B",
              help="Triton's max_batch_size (0: no batching)  [default: largest measured batch, at least 8]")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64), help="instance_group count")
@click.option("--kind", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu"]))
@click.option("--force", is_flag=True, help="replace the model's directory in the repository if it exists")
def export_triton_command(bundle, repo, name, version, max_batch_size, instances, kind, force) -> None:
    """Write BUNDLE as a Triton model repository entry: REPO/NAME/config.pbtxt, NAME/VERSION/model.onnx,
    labels.txt (a cascade: NAME-low and NAME-high, with a routing note)."""
    from vitcompress.deploy.triton import export_triton

    with user_errors():
        written = export_triton(bundle, repo, name=name, version=version, max_batch_size=max_batch_size,
                                instances=instances, kind=kind, force=force)
    for path in written:
        console.print(f"wrote {escape(str(path))}/: config.pbtxt, {version}/model.onnx, labels.txt", highlight=False)


@export.command("optimized")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--optimize-offline", "level", type=click.Choice(["basic", "extended", "all"]),
              help="write model.opt.onnx with onnxruntime's graph optimisations at LEVEL (beyond basic: "
                   "--for-this-machine)")
@click.option("--for-this-machine", is_flag=True, help="allow levels tied to this machine's CPU (recorded)")
@click.option("--ort-format", is_flag=True, help="write model.ort with onnxruntime's ORT-format converter")
def export_optimized_command(bundle, level, for_this_machine, ort_format) -> None:
    """Add offline-optimised models to BUNDLE for a faster start: each is checked against the golden logits,
    recorded in inference.json and SHA256SUMS."""
    from vitcompress.deploy.optimize import optimize_offline

    with user_errors():
        added = optimize_offline(bundle, level, for_this_machine=for_this_machine, ort_format=ort_format)
    console.print(f"added to {escape(str(bundle))}/: {', '.join(added)} (each matches the golden logits)",
                  highlight=False)


# ----------------------------------------------------------------------------------------------------- batch


class _ManifestFirst(click.Group):
    """``vitcompress batch MANIFEST …`` runs a manifest (the hidden ``run`` command); ``batch merge …`` joins
    shards."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


class LiveJobs:
    """The batch's live table (in a terminal) or one line per job (CI logs); the runner calls it from threads."""

    def __init__(self, names: list[str]) -> None:
        self.rows: dict[str, list[str]] = {name: ["waiting", "", ""] for name in names}
        self.starts: dict[str, float] = {}
        self.live = None

    def table(self) -> Table:
        table = Table(box=box.SIMPLE_HEAD, title="vitcompress batch")
        for column in ("job", "status", "s", "detail"):
            table.add_column(column, overflow="fold")
        for name, (status, seconds, detail) in self.rows.items():
            if status == "running":
                seconds = f"{time.monotonic() - self.starts[name]:.0f}"
            table.add_row(name, status, seconds, escape(detail))
        return table

    def __enter__(self) -> "LiveJobs":
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(get_renderable=self.table, console=console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def started(self, name: str) -> None:
        self.starts[name] = time.monotonic()
        self.rows[name] = ["running", "", ""]

    def finished(self, result: Any) -> None:
        from vitcompress.batch.outputs import job_line

        detail = "; ".join(g.message for g in result.failed_gates) or result.error or ""
        cached = " (cached)" if result.cache is not None and result.cache.hit and result.status != "cached" else ""
        self.rows[result.name] = [result.status + cached, f"{result.duration_s:.0f}", detail]
        if self.live is None:
            console.print(escape(job_line(result)), highlight=False, soft_wrap=True)


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    k, _, n = value.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise click.BadParameter(f"{value!r}: expected K/N with 1 ≤ K ≤ N, e.g. 2/4")
    return int(k), int(n)


def _batch_outputs(result: Any, out_dir: Path, as_json: bool) -> None:
    """Write batch.json, junit.xml, summary.md; print the annotations (GitHub Actions) and the result."""
    from vitcompress.batch.outputs import annotations, write_outputs

    write_outputs(result, out_dir)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in annotations(result):
            click.echo(line)
    if as_json:
        click.echo(result.model_dump_json(indent=2, by_alias=True))
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in result.counts.items() if n)
    console.print(f"batch: {counts} in {result.wall_s:.0f} s; wrote {out_dir}/: batch.json, junit.xml, summary.md",
                  highlight=False)


@main.group(cls=_ManifestFirst)
def batch() -> None:
    """Convert many models × recipes from a MANIFEST, each job isolated, cached and gated; CI-readable output.

    \b
    vitcompress batch MANIFEST.yaml [--out DIR] [--jobs N] [--shard K/N] [--cadence NAME] [--baseline FILE]
    vitcompress batch merge shard*/batch.json --out DIR

    Exit codes: 0 every job passed (cached passes count), 1 a gate failed, 2 bad manifest or usage (nothing
    ran), 3 a job crashed or timed out; --fail-on changes which of them fail the run.
    """


@batch.command("run", hidden=True)
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/batch"), show_default=True)
@click.option("--jobs", "parallel", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="jobs run at once; each gets cores // N threads")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="take jobs whose content key matches their finished bundle from the cache")
@click.option("--rerun-failed", is_flag=True, help="convert again the cached jobs whose gates failed")
@click.option("--shard", callback=_shard, metavar="K/N", help="run the K-th of N deterministic shares of the jobs")
@click.option("--cadence", metavar="NAME", help="run only jobs whose cadence names NAME (or that name none)")
@click.option("--baseline", type=click.Path(path_type=Path), help="a previous batch.json: fail on regressions")
@click.option("--fail-on", type=click.Choice(["error", "gate", "never"]), default="gate", show_default=True,
              help="what fails the run: crashes/timeouts only, also gates, or nothing")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a value of every recipe")
@click.option("--smoke", is_flag=True, help="random init, synthetic data, export and parity only (fast PR check)")
@click.option("--json", "as_json", is_flag=True, help="print batch.json to stdout")
def batch_run(manifest, out_dir, parallel, resume, rerun_failed, shard, cadence, baseline, fail_on, overrides,
              smoke, as_json) -> None:
    """Run the jobs of MANIFEST."""
    from vitcompress.batch.baseline import apply_baseline, load_baseline
    from vitcompress.batch.manifest import load_manifest
    from vitcompress.batch.runner import BatchInterrupted, Options, run_batch, thread_budget

    with user_errors():
        loaded = load_manifest(manifest, list(overrides), smoke=smoke)
        thread_budget(parallel)
        previous = load_baseline(baseline) if baseline is not None else None
        options = Options(out=out_dir, parallel=parallel, resume=resume, rerun_failed=rerun_failed, shard=shard,
                          cadence=cadence, fail_on=fail_on)
        try:
            with LiveJobs([job.name for job in loaded.jobs]) as live:
                result = run_batch(loaded, options, live)
        except BatchInterrupted as stopped:
            from vitcompress.batch.outputs import write_outputs

            write_outputs(stopped.result, out_dir)
            terminated = isinstance(stopped.cause, Terminated)
            code, what = (143, "terminated (SIGTERM)") if terminated else (130, "interrupted")
            _error_line(f"{what}: running jobs were killed; {len(stopped.result.jobs)} finished jobs are in "
                        f"{out_dir}/batch.json; run the same command again to resume")
            sys.exit(code)
        if previous is not None:
            apply_baseline(result, previous, loaded.manifest.baseline, str(baseline))
    _batch_outputs(result, out_dir, as_json)
    sys.exit(result.exit_code)


@batch.command("remeasure", hidden=True)
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("model")
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path), help=RECIPE_HELP)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="the weights the bundle was converted from")
@click.option("--data", help="the data the bundle was converted with (its images are timed)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe value")
@click.option("--random-init", is_flag=True, help="the bundle was converted from random weights")
@click.option("--model-arg", "model_arg_items", multiple=True, metavar="NAME=VALUE", help="as convert's")
@click.option("--reason", default="latency re-measured", help="why, for the report")
@click.option("--json", "as_json", is_flag=True, help="print the rewritten report.json to stdout")
def batch_remeasure(bundle_dir, model, recipe_path, checkpoint, data, overrides, random_init, model_arg_items, reason,
                    as_json) -> None:
    """Time BUNDLE_DIR's model.onnx again on this machine against its original MODEL and rewrite the bundle's
    latency fields; the converted model is not touched. The batch runs this, as a job, when only the machine or
    the timing settings changed since the bundle was converted."""
    from vitcompress.api import remeasure_latency
    from vitcompress.models import parse_model_args

    with user_errors():
        report = remeasure_latency(bundle_dir, model, recipe_path, overrides=list(overrides), checkpoint=checkpoint,
                                   data=data, random_init=random_init, model_args=parse_model_args(model_arg_items),
                                   reason=reason, progress=RichProgress(None))
    if as_json:
        click.echo(report.dump_json())


@batch.command("merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="where the merged files go")
@click.option("--json", "as_json", is_flag=True, help="print the merged batch.json to stdout")
def batch_merge(results, out_dir, as_json) -> None:
    """Join shard RESULTS (batch.json files) into one batch.json, junit.xml and summary.md."""
    from vitcompress.batch.merge import merge

    with user_errors():
        result = merge(list(results), out_dir)
    _batch_outputs(result, out_dir, as_json)
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
