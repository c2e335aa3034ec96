"""The ``vitcompress`` click group: its global options, and every command added to it.

Each command lives in its own module as a standalone click command or group (none of them imports this one);
this module only gathers them, so adding a command is one ``main.add_command`` line.
"""

from __future__ import annotations

import logging

import click
from rich.logging import RichHandler

from vitcompress.cli.batch import batch
from vitcompress.cli.bundle import export, predict, verify
from vitcompress.cli.common import OneLineErrors, console
from vitcompress.cli.convert import convert, plan, profile, recipes
from vitcompress.cli.page import report
from vitcompress.cli.sensitivity import sensitivity
from vitcompress.cli.tune import tune


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="log each converted module")
def main(verbose: bool) -> None:
    """vitcompress: make a pretrained Vision Transformer faster, export it to ONNX, prove it still agrees."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


main.add_command(convert)
main.add_command(plan)
main.add_command(profile)
main.add_command(recipes)
main.add_command(report)
main.add_command(sensitivity)
main.add_command(tune)
main.add_command(verify)
main.add_command(predict)
main.add_command(export)
main.add_command(batch)
