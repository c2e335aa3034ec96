"""The ``batch`` command group: run a manifest of models × recipes, merge shards, re-measure a bundle's latency.

``vitcompress batch MANIFEST …`` runs a manifest (the hidden ``run`` command); the runner, its cache, gates and
CI outputs live in :mod:`vitcompress.batch`, imported when a command runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from vitcompress.cli.common import RichProgress, Terminated, console, error_line, source_options, user_errors
from vitcompress.cli.render import jobs_table


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
        now = time.monotonic()
        return jobs_table({name: [status, f"{now - self.starts[name]:.0f}" if status == "running" else seconds, detail]
                           for name, (status, seconds, detail) in self.rows.items()})

    def __enter__(self) -> LiveJobs:
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
    """Write batch.json, junit.xml, summary.md, index.html; print the annotations (GitHub Actions) and the result."""
    from vitcompress.batch.outputs import annotations, write_outputs

    write_outputs(result, out_dir)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in annotations(result):
            click.echo(line)
    if as_json:
        click.echo(result.model_dump_json(indent=2, by_alias=True))
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in result.counts.items() if n)
    console.print(f"batch: {counts} in {result.wall_s:.0f} s; wrote {out_dir}/: batch.json, junit.xml, summary.md, "
                  f"index.html",
                  highlight=False)


@click.group(cls=_ManifestFirst)
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
def batch_run(manifest: Path, out_dir: Path, parallel: int, resume: bool, rerun_failed: bool,
              shard: tuple[int, int] | None, cadence: str | None, baseline: Path | None, fail_on: str,
              overrides: tuple[str, ...], smoke: bool, as_json: bool) -> None:
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
            error_line(f"{what}: running jobs were killed; {len(stopped.result.jobs)} finished jobs are in "
                       f"{out_dir}/batch.json; run the same command again to resume")
            sys.exit(code)
        if previous is not None:
            apply_baseline(result, previous, loaded.manifest.baseline, str(baseline))
    _batch_outputs(result, out_dir, as_json)
    sys.exit(result.exit_code)


@batch.command("remeasure", hidden=True)
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("model")
@source_options(checkpoint_help="the weights the bundle was converted from",
                data_help="the data the bundle was converted with (its images are timed)",
                set_help="override a recipe value", random_init_help="the bundle was converted from random weights",
                model_arg_help="as convert's")
@click.option("--reason", default="latency re-measured", help="why, for the report")
@click.option("--json", "as_json", is_flag=True, help="print the rewritten report.json to stdout")
def batch_remeasure(bundle_dir: Path, model: str, recipe_path: Path, checkpoint: Path | None, data: str | None,
                    overrides: tuple[str, ...], random_init: bool, model_arg_items: tuple[str, ...], reason: str,
                    as_json: bool) -> None:
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
@click.option("--allow-partial", is_flag=True, help="merge the shards given even when some are missing (named in "
              "the output and in batch.json's missing_shards)")
@click.option("--json", "as_json", is_flag=True, help="print the merged batch.json to stdout")
def batch_merge(results: tuple[Path, ...], out_dir: Path, allow_partial: bool, as_json: bool) -> None:
    """Join shard RESULTS (batch.json files) into one batch.json, junit.xml and summary.md.

    Every shard of one manifest must be there, each once: a missing shard, results of different manifests or
    overlapping shards are an error (exit 2) unless --allow-partial (missing shards only)."""
    from vitcompress.batch.merge import merge

    with user_errors():
        result = merge(list(results), out_dir, allow_partial=allow_partial)
    if result.missing_shards:
        console.print(f"warning: merged without shard{'s' if len(result.missing_shards) > 1 else ''} "
                      f"{', '.join(result.missing_shards)}: their jobs are not in the result", highlight=False)
    _batch_outputs(result, out_dir, as_json)
    sys.exit(result.exit_code)
