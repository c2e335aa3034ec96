"""The deployment commands on a convert output bundle: ``verify``, ``predict``, ``export triton|optimized``.

They need onnxruntime only, never torch: each imports its part of :mod:`vitcompress.deploy` when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from vitcompress.cli.common import console, user_errors
from vitcompress.cli.render import predictions_table


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="onnxruntime execution provider")
@click.option("--json", "as_json", is_flag=True, help="print the checks as JSON to stdout")
def verify(bundle: Path, provider: str, as_json: bool) -> None:
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


@click.command()
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
def predict(bundle: Path | None, images: tuple[Path, ...], top_k: int | None, batch_size: int, threads: int,
            provider: str, cascade_dir: Path | None, as_json: bool) -> None:
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
    threshold = predictor.cascade.threshold if predictor.cascade is not None else None
    Console().print(predictions_table(bundle, rows, top_k, threshold))
    if threshold is not None:
        early = sum(r["model"] == "low" for r in rows)
        console.print(f"{early}/{len(rows)} images exited at the low-effort model")


@click.group()
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
def export_triton_command(bundle: Path, repo: Path, name: str | None, version: int, max_batch_size: int | None,
                          instances: int, kind: str, force: bool) -> None:
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
def export_optimized_command(bundle: Path, level: str | None, for_this_machine: bool, ort_format: bool) -> None:
    """Add offline-optimised models to BUNDLE for a faster start: each is checked against the golden logits,
    recorded in inference.json and SHA256SUMS."""
    from vitcompress.deploy.optimize import optimize_offline

    with user_errors():
        added = optimize_offline(bundle, level, for_this_machine=for_this_machine, ort_format=ort_format)
    console.print(f"added to {escape(str(bundle))}/: {', '.join(added)} (each matches the golden logits)",
                  highlight=False)
