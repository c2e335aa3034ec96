"""README.md and docs/: every generated block agrees with the results file it is rendered from (bench/pages.py),
and every relative link resolves to a file."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages_module():
    spec = importlib.util.spec_from_file_location("bench_pages", ROOT / "bench" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pages = _pages_module()


def test_pages_agree_with_results_files():
    assert pages.check(ROOT) == []


def _copy(tmp_path: Path) -> Path:
    """README.md, docs/ and the non-code files of bench/ (results, notes, the plot) in a scratch repository."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("*.py", "__pycache__", "runs"))
    return tmp_path


def test_check_names_page_and_block_of_an_edited_number(tmp_path):
    root = _copy(tmp_path)
    page = root / "docs" / "benchmark.md"
    text = page.read_text()
    block = text[text.index("<!-- bench:start -->"):text.index("<!-- bench:end -->")]
    edited = block.replace("| deit_s | fast | ", "| deit_s | fast | ~", 1)
    assert edited != block
    page.write_text(text.replace(block, edited))
    assert pages.check(root) == ["docs/benchmark.md: block 'bench' disagrees with bench/results/*.json"]
    pages.write(root)
    assert pages.check(root) == []


def test_check_reports_a_results_file_that_changed(tmp_path):
    root = _copy(tmp_path)
    results = root / "bench" / "deploy.json"
    results.write_text(results.read_text().replace('"verify_cli_s": 0.', '"verify_cli_s": 9.', 1))
    assert pages.check(root) == ["docs/deploy.md: block 'deploy' disagrees with bench/deploy.json"]


def test_check_reports_an_unknown_or_missing_block(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    start = text.index("<!-- headline:start -->")
    end = text.index("<!-- headline:end -->") + len("<!-- headline:end -->")
    readme.write_text(text[:start] + "<!-- nonsense:start -->\n<!-- nonsense:end -->" + text[end:])
    assert sorted(pages.check(root)) == ["README.md: block 'nonsense' is not one bench/pages.py renders",
                                         "block 'headline' (bench/results/*.json) is on no page"]


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    missing = [target for target in _links(page) if not (page.parent / target.split("#")[0]).exists()]
    assert missing == [], f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_readme_is_short_and_names_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make test" in readme
