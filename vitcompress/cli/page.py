"""``vitcompress report BUNDLE``: rebuild a bundle's report.html from its files, without running a model."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import click

from vitcompress.cli.common import user_errors


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--sensitivity", type=click.Path(path_type=Path), metavar="FILE",
              help="a `vitcompress sensitivity` result to draw as the heat map (default: the bundle's own, if any)")
@click.option("--open", "open_page", is_flag=True, help="open the page in the default web browser")
def report(bundle: Path, sensitivity: Path | None, open_page: bool) -> None:
    """Write BUNDLE/report.html (a vitcompress convert output) from report.json, predictions.npz and the rest of
    the bundle: the accuracy ladder, latency, disagreements, sensitivity heat map, recipe and checksums."""
    from vitcompress.page.report_page import write_report_page

    with user_errors():
        path = write_report_page(bundle, sensitivity)
    click.echo(f"report: {path.resolve()}")
    if open_page:
        webbrowser.open(path.resolve().as_uri())
