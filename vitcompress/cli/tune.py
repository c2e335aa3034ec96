"""The ``tune`` command: search recipes for MODEL within an accuracy budget and write the Pareto front.

torch, optuna and the library are imported inside the command so that ``--help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from vitcompress.cli.common import RichProgress, console, error_line, user_errors

SHOWN_TRIALS = 12


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class TrialTable:
    """The trials as they finish: a live table of the latest in a terminal, one line per trial elsewhere."""

    def __init__(self, live: Live | None) -> None:
        self.live = live
        self.rows: list[Any] = []

    def __call__(self, line: Any) -> None:
        self.rows = [*self.rows, line][-SHOWN_TRIALS:]
        speed = f"{line.speedup:.2f}×" if line.speedup is not None else "—"
        drop = f"{line.drop:+.2f}" if line.drop is not None else "—"
        best = f"{line.best_speedup:.2f}×" if line.best_speedup else "none yet"
        status = (f"{line.done}/{line.total} trials, best meeting the constraints {best}, "
                  f"{_duration(line.elapsed_s)} elapsed, about {_duration(line.left_s)} left")
        if self.live is None:
            what = escape(line.note[:120] if line.state == "pruned" else line.summary)
            mark = "✓" if line.meets else " "
            console.print(f"{'trial':>9} {line.number:>3} {mark} {speed:>7} drop {drop:>6}  {what}  [dim]({status})[/]",
                          highlight=False)
            return
        table = Table(title="vitcompress tune", caption=status, expand=False)
        for column in ("trial", "speed-up", "drop (pt)", "meets", "recipe"):
            table.add_column(column, justify="right" if column != "recipe" else "left")
        for row in self.rows:
            table.add_row(str(row.number), f"{row.speedup:.2f}×" if row.speedup is not None else "—",
                          f"{row.drop:+.2f}" if row.drop is not None else "—", "✓" if row.meets else "",
                          escape(row.note[:60] if row.state == "pruned" else row.summary))
        self.live.update(table)


def _dashboard(out_dir: Path, storage: str | None) -> None:
    """Say how to open the study in optuna-dashboard (an optional extra)."""
    import importlib.util

    url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if importlib.util.find_spec("optuna_dashboard") is None:
        console.print("optuna-dashboard is not installed: pip install 'vitcompress[dashboard]'", highlight=False)
    print(f"optuna-dashboard {url}")


@click.command()
@click.argument("model", required=False)
@click.option("--data", help="fmnist, synthetic, or an image directory (DIR/<class>/*: a seeded held-out split "
                             "chooses the recipe; or DIR/train + DIR/val)")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="weights: .safetensors, .pth or .pt")
@click.option("--random-init", is_flag=True, help="random weights: with --objective latency")
@click.option("--model-arg", "model_arg_items", multiple=True, metavar="NAME=VALUE",
              help="timm.create_model argument that changes the architecture (with --random-init)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="a value every trial's recipe shares, e.g. calibration.images=256")
@click.option("--space", "space_path", type=click.Path(path_type=Path), help="search space YAML (docs/tune.md)")
@click.option("--objective", type=click.Choice(["accuracy", "latency"]), default="accuracy", show_default=True)
@click.option("--max-drop", default=1.0, show_default=True, type=float, help="top-1 points the recipe may lose")
@click.option("--target-speedup", type=float, help="speed-up over the original that the recipe must reach")
@click.option("--target-latency-ms", type=float, help="latency at --batch-size that the recipe must reach")
@click.option("--trials", default=60, show_default=True, type=int, help="finished trials the study stops at")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 4096), help="timed batch size")
@click.option("--images", default=1000, show_default=True, type=click.IntRange(1),
              help="held-out images per trial")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(3, 10_000),
              help="timed runs per model and trial (interleaved with the original)")
@click.option("--finetune-steps", default=0, show_default=True, type=click.IntRange(0, 1_000_000),
              help="distillation steps given to promising trials (0: training-free)")
@click.option("--workers", default=1, show_default=True, type=int, help="processes running trials")
@click.option("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db; postgresql://… to share a "
                                "study between machines)")
@click.option("--study-name", default="vitcompress-tune", show_default=True)
@click.option("--sampler", type=click.Choice(["tpe", "nsga2"]), default="tpe", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--sensitivity", "sensitivity_path", type=click.Path(path_type=Path),
              help="reuse this sensitivity.json instead of mapping the steps first")
@click.option("--no-sensitivity", is_flag=True, help="start without the sensitivity map's seed trials")
@click.option("--confirm", default=5, show_default=True, type=int,
              help="replays at the end that re-measure the front's entries (3x the timed runs), so the front rests "
                   "on timings a replay reproduces; 0: none")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("tune"), show_default=True)
@click.option("--dashboard", is_flag=True, help="print how to open the study in optuna-dashboard, and exit")
def tune(model: str | None, data: str | None, checkpoint: Path | None, random_init: bool,
         model_arg_items: tuple[str, ...], overrides: tuple[str, ...], space_path: Path | None, objective: str,
         max_drop: float, target_speedup: float | None, target_latency_ms: float | None, trials: int,
         batch_size: int, images: int, runs: int, finetune_steps: int, workers: int, storage: str | None,
         study_name: str, sampler: str, seed: int, sensitivity_path: Path | None, no_sensitivity: bool,
         confirm: int, out_dir: Path, dashboard: bool) -> None:
    """Find the fastest recipes for MODEL within --max-drop, measured on this machine; write the Pareto front.

    Every trial is a real conversion (apply, export, onnxruntime latency interleaved with the original, top-1 and
    agreement on held-out images). The study lives in --storage (default OUT/study.db): rerun the same command to
    resume it. Writes OUT/pareto/NN.yaml (replay with vitcompress convert MODEL --recipe OUT/pareto/NN.yaml),
    OUT/pareto.json and OUT/pareto.html. Exit 0 names the fastest recipe meeting the constraints; exit 1 names
    the nearest miss."""
    if dashboard:
        _dashboard(out_dir, storage)
        return
    with user_errors():
        from vitcompress.errors import UsageError
        from vitcompress.models import parse_model_args
        from vitcompress.search.run import tune as run_tune

        if sensitivity_path is not None and no_sensitivity:
            raise UsageError("--sensitivity and --no-sensitivity exclude each other")
        live = Live(console=console, transient=False, auto_refresh=False) if console.is_terminal else None
        table = TrialTable(live)
        try:
            if live is not None:
                live.start()
            result = run_tune(
                model, data=data, checkpoint=checkpoint, random_init=random_init,
                model_args=parse_model_args(model_arg_items), overrides=list(overrides), space=space_path,
                objective=objective, max_drop=max_drop, target_speedup=target_speedup,
                target_latency_ms=target_latency_ms, trials=trials, batch_size=batch_size, images=images, runs=runs,
                finetune_steps=finetune_steps, workers=workers, storage=storage, study_name=study_name,
                sampler=sampler, seed=seed, sensitivity=False if no_sensitivity else sensitivity_path or True,
                confirm=confirm, out_dir=out_dir, progress=RichProgress(None), on_trial=table)
        except KeyboardInterrupt:
            error_line(f"interrupted (Ctrl-C): the study keeps its finished trials; run the same command to resume "
                       f"({out_dir})")
            sys.exit(130)
        finally:
            if live is not None:
                live.stop()
    console.print(f"wrote {out_dir}/: pareto/ ({len(result.front)} recipes), pareto.json, pareto.html; "
                  f"{result.trials} trials, {result.refused} refused combinations, {result.confirmed} confirmed by a replay",
                  highlight=False)
    if result.best is not None:
        best = result.best
        click.echo(f"best: {out_dir / best.file}: {best.measured.speedup:.2f}× "
                   f"({best.measured.original_ms:.2f} → {best.measured.latency_ms:.2f} ms at batch {batch_size}), "
                   f"drop {best.measured.drop:.2f} pt, {best.summary} — replay: vitcompress convert "
                   f"{result.settings.model} --recipe {out_dir / best.file}")
        return
    miss = result.nearest_miss
    where = (f"nearest miss: trial {miss.trial} ({miss.summary}): {miss.measured.speedup:.2f}×, drop "
             f"{miss.measured.drop:.2f} pt" if miss else "no trial was measured")
    click.echo(f"no recipe met {result.settings.target_text()} in {result.trials} trials; {where}")
    sys.exit(1)
