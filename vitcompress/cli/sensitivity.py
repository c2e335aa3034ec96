"""The ``sensitivity`` command: each recipe step alone on each block group, its accuracy cost and latency gain,
training-free, written to a JSON file.

torch and the library are imported inside the command so that ``--help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path

import click

from vitcompress.cli.common import RichProgress, console, source_options, user_errors


@click.command()
@click.argument("model", required=False)
@source_options(model_arg_help="timm.create_model argument that changes the architecture, e.g. depth=4 "
                               "(with --random-init)")
@click.option("--groups", default=4, show_default=True, type=click.IntRange(1), metavar="N",
              help="contiguous groups of transformer blocks, one cell per step and group")
@click.option("--images", default=500, show_default=True, type=click.IntRange(1), metavar="N",
              help="validation images for top-1 and agreement (the recipe's validate.images when fewer)")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 4096), help="timed batch size")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="timed runs per model and cell (interleaved with the original)")
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=Path("sensitivity.json"),
              show_default=True)
@click.option("--force", is_flag=True, help="replace the output file if it exists")
def sensitivity(model: str | None, recipe_path: Path, checkpoint: Path | None, data: str | None,
                overrides: tuple[str, ...], random_init: bool, model_arg_items: tuple[str, ...], groups: int,
                images: int, batch_size: int, runs: int, out_file: Path, force: bool) -> None:
    """Map each recipe step's cost and gain on each group of MODEL's transformer blocks, training-free.

    Per step and block group: a copy of the model with only that step, only on those blocks; its torch top-1
    and agreement with the original on the validation images, and its onnxruntime latency timed interleaved
    with the original's. No fine-tuning; export.quantize is not applied. Writes --out (JSON)."""
    from vitcompress.errors import OutputError
    from vitcompress.files import replace_text
    from vitcompress.models import check_model_args, parse_model_args
    from vitcompress.sensitivity_map import sensitivity as run_sensitivity

    with user_errors():
        if out_file.exists() and not force:
            raise OutputError(f"{out_file} exists: pass --force to replace it")
        if out_file.is_dir():
            raise OutputError(f"{out_file} is a directory: --out names the JSON file to write")
        model_args = parse_model_args(model_arg_items)
        check_model_args(model_args, checkpoint, random_init)
        result = run_sensitivity(model, recipe_path, checkpoint=checkpoint, data=data, overrides=list(overrides),
                                 random_init=random_init, model_args=model_args, groups=groups, images=images,
                                 batch_size=batch_size, runs=runs, progress=RichProgress(None))
        replace_text(out_file, result.model_dump_json(indent=2) + "\n")
    console.print(f"wrote {out_file}: {len(result.steps)} steps × {len(result.groups)} block groups")
