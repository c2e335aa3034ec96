"""The study as processes see it: SIGKILL of a running tune and a rerun of the same command resume it (the killed
trial failed and queued again, nothing finished lost); two workers share one SQLite study; two "machines" (two
processes with their own --out) share one PostgreSQL study started by the test."""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

ROOT = Path(__file__).parent.parent.parent
TINY = ["--random-init", "--model-arg", "depth=2", "--data", "synthetic", "--images", "16", "--runs", "3",
        "--set", "validate.warmup_runs=1", "--set", "calibration.images=16", "--set", "calibration.batch_size=16",
        "--no-sensitivity", "--max-drop", "100"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitcompress", "tune", "vit_fmnist", *TINY, "--out", str(out), *extra]


def study(storage: str):
    return optuna.load_study(study_name="vitcompress-tune", storage=storage)


def finished(storage: str) -> list:
    return study(storage).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_states(path: Path) -> list[str]:
    """The trials' states read with sqlite3 alone: the test must not create the schema the tune process is
    creating (as loading an Optuna study would)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return [state for (state,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # no file or no table yet
        return []


def test_sigkill_then_the_same_command_resumes_the_study(tmp_path):
    out = tmp_path / "tune"
    storage = f"sqlite:///{out / 'study.db'}"
    process = subprocess.Popen(command(out, "--trials", "4"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # kill while a trial runs, after at least one finished
            time.sleep(0.3)
            states = trial_states(out / "study.db")
            if "COMPLETE" in states and states[-1] == "RUNNING":
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    before = {t.number: t.params for t in finished(storage)}
    killed = [t for t in study(storage).trials if t.state == TrialState.RUNNING]
    assert before and len(killed) == 1, "the test did not catch a running trial"
    rerun = subprocess.run(command(out, "--trials", "4"), cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 trial(s) of a stopped worker failed and queued again" in rerun.stderr
    after = study(storage).trials
    assert len([t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 4
    assert {t.number: t.params for t in after if t.number in before} == before  # nothing finished was lost
    assert after[killed[0].number].state == TrialState.FAIL
    retried = [t for t in after if t.user_attrs.get("retry_of") == killed[0].number]
    # the killed trial's parameters come back (one killed while it was still drawing them has fewer: the rest
    # are drawn anew)
    assert len(retried) == 1 and retried[0].params.items() >= killed[0].params.items()
    assert (out / "pareto.json").is_file()


def test_two_workers_share_one_sqlite_study(tmp_path):
    out = tmp_path / "tune"
    run = subprocess.run(command(out, "--trials", "4", "--workers", "2"), cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    trials = finished(f"sqlite:///{out / 'study.db'}")
    assert 4 <= len(trials) <= 5  # a worker that started its trial before the count was reached finishes it
    assert len({t.user_attrs["worker"] for t in trials}) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A real PostgreSQL server in a temporary directory (as the postgres user when the test runs as root);
    skipped with the reason when PostgreSQL is not installed."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install 'vitcompress[postgres]')")
    bin_dir = Path(initdb).resolve().parent
    data = Path(tempfile.mkdtemp(prefix="vitcompress-pg-"))  # outside pytest's root-only tmp tree
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tune"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "-l", str(data / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*as_user, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tune",
                        "study"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/study"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_machines_share_one_postgresql_study(tmp_path, postgres):
    """docs/tune.md's walk-through: each machine runs the same command with the shared --storage and its own
    --out; the study stops at --trials finished trials counted over both; each writes the whole front."""
    runs = [subprocess.Popen(command(tmp_path / name, "--trials", "4", "--storage", postgres), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    trials = finished(postgres)
    assert 4 <= len(trials) <= 5
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert not (tmp_path / "a" / "study.db").exists()
    assert (tmp_path / "a" / "pareto.json").is_file() and (tmp_path / "b" / "pareto.json").is_file()
