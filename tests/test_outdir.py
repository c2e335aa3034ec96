"""The output transaction (vitcompress/outdir.py): ``--force`` replaces only a bundle whose SHA256SUMS lists every
file in it, the lock file is never deleted, ``--out`` is checked again under the lock, and two real processes
racing for one ``--out`` leave one whole bundle."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import FAST
from vitcompress.cli import main
from vitcompress.deploy.bundle import check_checksums, write_checksums
from vitcompress.errors import OutputError
from vitcompress.outdir import OutputTransaction, check_out_dir, lock_path, output_lock, unlisted_files

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "tests" / "bad_inputs" / "tiny_svd.yaml"
IDENTITY = {"recipe": "test"}


def fake_bundle(directory: Path) -> Path:
    """A directory shaped like a bundle: a few files and the SHA256SUMS that lists them."""
    (directory / "golden").mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"onnx")
    (directory / "report.json").write_text('{"schema_version": 1}')
    (directory / "preprocess.json").write_text("{}")
    (directory / "golden" / "golden.json").write_text("{}")
    write_checksums(directory)
    return directory


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed), files with their SHA-256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def whole_bundle(directory: Path) -> None:
    """Every file SHA256SUMS lists is there with its hash, and nothing else is."""
    check_checksums(directory)
    assert unlisted_files(directory) == ([], True)


def convert_force(out: Path):
    return CliRunner().invoke(main, ["convert", "test_vit", "--random-init", "--recipe", str(TINY_RECIPE), "--out",
                                     str(out), "--force"], catch_exceptions=False)


# ------------------------------------------------------------------------------------------- 1. what --force replaces


def test_force_accepts_an_empty_directory_and_a_bundle_that_lists_every_file(tmp_path):
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", force=True)
    check_out_dir(fake_bundle(tmp_path / "bundle"), force=True)


@pytest.mark.parametrize(("foreign", "named"), [
    (["notes.txt"], "notes.txt"),
    (["golden/extra.npy"], "golden/extra.npy"),
    ([f"f{i}.txt" for i in range(7)], "f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 2 more"),
])
def test_force_refuses_a_bundle_holding_a_file_its_sha256sums_does_not_list(tmp_path, foreign, named):
    out = fake_bundle(tmp_path / "out")
    for name in foreign:
        (out / name).write_text("mine")
    with pytest.raises(OutputError, match="not listed in its SHA256SUMS") as raised:
        check_out_dir(out, force=True)
    assert named in str(raised.value)


def test_force_refuses_files_without_sha256sums_even_with_a_report_json_of_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"schema_version": 1}')
    (out / "old.txt").write_text("x")
    with pytest.raises(OutputError, match=r"no readable SHA256SUMS\): old.txt, report.json;"):
        check_out_dir(out, force=True)


def test_cli_force_over_a_bundle_with_a_foreign_file_touches_nothing(tmp_path):
    out = fake_bundle(tmp_path / "out")
    (out / "golden" / "mine.bin").write_bytes(b"\x00\x01 precious")
    before = snapshot(tmp_path)
    result = convert_force(out)
    lines = result.output.strip("\n").splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "golden/mine.bin" in lines[0] and "nothing was changed" in lines[0]
    assert snapshot(tmp_path) == before
    assert (out / "golden" / "mine.bin").read_bytes() == b"\x00\x01 precious"


# ---------------------------------------------------------------------------------------------- 2. the lock file


def test_the_lock_file_outlives_its_holder_and_lies_outside_the_users_tree(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        inode = lock_path(out).stat().st_ino
        with pytest.raises(OutputError, match="another vitcompress convert is writing"), output_lock(out):
            pass
    assert lock_path(out).stat().st_ino == inode, "released, never deleted: a waiter locks the same file"
    assert not tmp_path.is_relative_to(lock_path(out).parent) and not list(tmp_path.iterdir())
    assert lock_path(tmp_path / "sub" / ".." / "out") == lock_path(out)


def test_another_process_cannot_take_the_lock_while_it_is_held(tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from filelock import FileLock, Timeout\n"
            "try:\n    FileLock(sys.argv[1]).acquire(blocking=False)\nexcept Timeout:\n    sys.exit(3)")
    with output_lock(out):
        assert subprocess.run([sys.executable, "-c", code, str(lock_path(out))], check=False).returncode == 3
    assert subprocess.run([sys.executable, "-c", code, str(lock_path(out))], check=False).returncode == 0


# ------------------------------------------------------------------------------------ 3. the check under the lock


def test_out_is_checked_again_under_the_lock(tmp_path):
    """Two runs without --force both pass the early check; the one that gets the lock after the other finished
    is refused instead of replacing that run's bundle."""
    out = tmp_path / "runs" / "out"
    first, second = OutputTransaction(out), OutputTransaction(out)
    first.check()
    second.check()
    with first.writing(IDENTITY, checkpointing=False) as work_dir:
        fake_bundle(work_dir)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="exists: pass --force"), second.writing(IDENTITY, checkpointing=False):
        pytest.fail("the second run must not start writing")
    assert snapshot(tmp_path) == before
    whole_bundle(out)


def test_a_file_added_during_the_run_keeps_the_directory_as_it_is(tmp_path):
    out = fake_bundle(tmp_path / "out")
    output = OutputTransaction(out, force=True)
    with pytest.raises(OutputError, match="changed during the conversion"), \
            output.writing(IDENTITY, checkpointing=False) as work_dir:
        fake_bundle(work_dir)
        (out / "added.txt").write_text("mine")
    assert (out / "added.txt").read_text() == "mine" and (out / "model.onnx").read_bytes() == b"onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no work directory or old copy left"


def test_a_failed_run_removes_its_work_directory_and_the_parents_it_made(tmp_path):
    output = OutputTransaction(tmp_path / "new" / "deeper" / "out")
    with pytest.raises(RuntimeError), output.writing(IDENTITY, checkpointing=False) as work_dir:
        (work_dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("stage failed")
    assert not list(tmp_path.iterdir())


def test_a_temporary_output_is_ours_and_discarded_after_a_failure():
    output = OutputTransaction(None)
    output.check()
    assert output.checkpoint_dir is None and output.out_dir.is_dir()
    output.discard()
    assert not output.out_dir.exists()
    with pytest.raises(OutputError, match="--resume continues a conversion into its output directory"):
        OutputTransaction(None, resume=True)


# ------------------------------------------------------------------------------ 4. two processes racing for --out


RACE = [*FAST, "validate.images=16", "validate.batch_sizes=[1]", "calibration.images=16", "finetune.steps=1"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    sets = [x for item in RACE for x in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "vitcompress", "convert", "vit_fmnist", "--recipe", "svd", "--out",
                             str(out), "--random-init", "--data", "synthetic", "--model-arg", "depth=2", *sets, *extra],
                            cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def race(out: Path, *extra: str) -> list[tuple[int, str]]:
    processes = [start(out, *extra), start(out, *extra)]
    return [(p.wait(timeout=300), p.stderr.read()) for p in processes]


def refused(code: int, stderr: str, *messages: str) -> bool:
    """Exit 2 with one error line, the last, saying one of ``messages``."""
    lines = stderr.strip("\n").splitlines()
    return code == 2 and sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in stderr \
        and lines[-1].startswith("error: ") and any(m in lines[-1] for m in messages)


def no_leftovers(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == ["out"], "no work directory, old copy or checkpoints"


@pytest.mark.slow
def test_two_processes_without_force_one_writes_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    results = race(out)
    wrote = [r for r in results if r[0] in (0, 1)]  # 1: a validation gate of the random model failed
    assert len(wrote) == 1, results
    loser = next(r for r in results if r not in wrote)
    assert refused(*loser, "another vitcompress convert is writing", "exists: pass --force"), loser
    whole_bundle(out)
    no_leftovers(tmp_path)


@pytest.mark.slow
def test_two_processes_with_force_leave_one_whole_bundle(tmp_path):
    out = tmp_path / "out"
    results = race(out, "--force")
    assert any(code in (0, 1) for code, _ in results), results
    for code, stderr in results:
        assert code in (0, 1) or refused(code, stderr, "another vitcompress convert is writing"), stderr
    whole_bundle(out)
    first = snapshot(out)
    again = start(out, "--force")  # in turn: replaces the real bundle, as a whole
    assert again.wait(timeout=300) in (0, 1), again.stderr.read()
    whole_bundle(out)
    assert snapshot(out) != first
    no_leftovers(tmp_path)


def test_the_page_is_part_of_a_bundle_without_being_listed(tmp_path):
    """report.html is a view of listed files: SHA256SUMS leaves it out (so rebuilding it keeps the sums valid) and
    --force still recognises the bundle; a page in a subfolder is not the bundle's page."""
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "report.html").write_text("<html></html>")
    write_checksums(bundle)
    assert "report.html" not in (bundle / "SHA256SUMS").read_text()
    whole_bundle(bundle)
    (bundle / "golden" / "report.html").write_text("<html></html>")
    assert unlisted_files(bundle) == (["golden/report.html"], True)
