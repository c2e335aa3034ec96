"""The machine's latency lock: held by every timed measurement, by default too, across processes, re-entrant."""

import json
import subprocess
import sys
import time

from filelock import FileLock, Timeout

from vitcompress.deploy import timing_lock
from vitcompress.deploy.timing_lock import DEFAULT_LOCK, LOCK_ENV, WAITS_ENV, latency_lock, lock_path
from vitcompress.measure import measure_latency_weights

HOLD = ("import sys, time\nfrom vitcompress.deploy.timing_lock import latency_lock\n"
        "with latency_lock('held by a test'):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[1]))\n")


def test_without_the_batch_runner_every_process_shares_one_lock(monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    assert lock_path() == DEFAULT_LOCK


def test_a_second_process_waits_for_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "latency.lock"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        try:
            FileLock(tmp_path / "latency.lock").acquire(timeout=0.2)
            raise AssertionError("took the lock while another process held it")
        except Timeout:
            pass
        started = time.monotonic()
        with latency_lock("after the holder"):
            waited = time.monotonic() - started
        assert waited > 0.5, "latency_lock did not wait for the other process"
    finally:
        holder.wait(timeout=30)


def test_nested_holds_in_one_process_do_not_deadlock(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "latency.lock"))
    waits = tmp_path / "waits.jsonl"
    monkeypatch.setenv(WAITS_ENV, str(waits))
    with latency_lock("outer"), latency_lock("inner"):
        pass
    assert [json.loads(line)["what"] for line in waits.read_text().splitlines()] == ["inner", "outer"]


def test_the_moe_kernel_timing_holds_the_lock(tmp_path, monkeypatch):
    """``latency_weights: measure`` (and the planner's int8 costs) time under the lock, recorded like the others."""
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "latency.lock"))
    waits = tmp_path / "waits.jsonl"
    monkeypatch.setenv(WAITS_ENV, str(waits))
    dense, shift = measure_latency_weights(16, 32, int8=True)
    assert dense > 0 and shift > 0
    (record,) = [json.loads(line) for line in waits.read_text().splitlines()]
    assert record["what"] == "expert kernels 16→32" and record["held_s"] > 0
    assert timing_lock.lock_path() == tmp_path / "latency.lock"
