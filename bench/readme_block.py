"""Replace a generated block of README.md (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``), so that
the numbers in README are the ones the bench scripts wrote."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_readme_block(name: str, text: str) -> None:
    """Put ``text`` between README's ``name`` markers; a README without them is left as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    readme = README.read_text()
    if start in readme and end in readme:
        head, rest = readme.split(start, 1)
        README.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")
