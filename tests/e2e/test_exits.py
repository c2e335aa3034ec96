"""How commands end when something goes wrong outside the user's input: crashes and signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import FAST
from vitcompress.cli import CRASH_EXIT_CODE, main


def test_unexpected_exception_is_one_line_with_a_traceback_log_and_its_own_exit_code(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault\nsecond line")

    monkeypatch.setattr("vitcompress.profile.profile_bundle", broken)
    result = CliRunner().invoke(main, ["profile", str(tmp_path)], catch_exceptions=False)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == CRASH_EXIT_CODE not in (1, 2) and len(lines) == 1, result.output
    assert lines[0].startswith("error: internal error: RuntimeError: injected fault (full traceback in ")
    log = Path(lines[0].split("full traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    log.unlink()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_convert_exits_with_its_code_and_leaves_nothing(tmp_path, signum, code):
    sets = [x for item in FAST for x in ("--set", item)]
    process = subprocess.Popen([sys.executable, "-m", "vitcompress.cli", "convert", "vit_fmnist", "--recipe",
                                str(Path(__file__).parents[2] / "recipes" / "svd.yaml"), "--out",
                                str(tmp_path / "run"), *sets], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"},
                               # a shell's background job starts with SIGINT ignored; a user's terminal does not
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    process.stderr.readline()  # the first stage line: the hidden work directory exists by now
    time.sleep(1)
    process.send_signal(signum)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == code, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no bundle, no hidden .partial directory"


def run_force(out: str, cwd: Path):
    recipe = Path(__file__).parents[1] / "bad_inputs" / "tiny_svd.yaml"
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["convert", "test_vit", "--random-init", "--recipe", str(recipe), "--out", out,
                                         "--force"], catch_exceptions=False)
    finally:
        os.chdir(previous)


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("out", "message"), [
    (".", "is the working directory or one of its parents"),
    ("..", "is the working directory or one of its parents"),
    ("../data", "holds files that are not a vitcompress bundle"),
])
def test_force_never_replaces_the_working_directory_or_other_files(tmp_path, out, message):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    data.mkdir()
    (work / "notes.txt").write_text("mine")
    (data / "images.bin").write_bytes(b"\x00" * 10)
    (data / "report.json").write_text('{"not": "ours"}')
    before = snapshot(tmp_path)
    result = run_force(out, work)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert snapshot(tmp_path) == before


def test_a_second_conversion_to_the_same_output_is_refused_while_the_first_runs(tmp_path):
    from vitcompress.outdir import output_lock

    with output_lock(tmp_path / "run"):
        result = run_force("run", tmp_path)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2 and "another vitcompress convert is writing" in lines[-1], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no bundle, no work directory, no lock file"
