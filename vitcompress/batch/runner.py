"""Run a batch: every job a ``python -m vitcompress convert … --json`` in its own process group.

Isolation: a job runs in a new session (its own process group), with its own log file, a thread budget
(``OMP_NUM_THREADS`` and the like, and the recipe's ORT ``validate.threads`` capped, so that parallel jobs ×
threads ≤ cores) and a timeout that kills the whole group (SIGTERM, then SIGKILL). A crash, an out-of-memory
kill, a hang or a failed gate of one job is that job's result; the others run on. Latency measurements of all
jobs are serialised by :mod:`vitcompress.deploy.timing_lock`.

Caching: a job whose content key (:mod:`vitcompress.batch.keys`) matches its finished bundle is not run; its
gates are evaluated again from the bundle's ``report.json``. An interrupted batch therefore resumes where it
stopped: finished jobs are hits, the rest run. A job whose conversion key matches but whose latency key does not
(another machine, other timing settings) is re-measured, not converted: ``vitcompress batch remeasure`` runs as
its process (same isolation, timeout and latency lock) and rewrites the bundle's latency fields.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Protocol

from filelock import FileLock, Timeout

from vitcompress.batch.gates import evaluate, metrics
from vitcompress.batch.keys import (
    job_components,
    keys_of,
    latency_reasons,
    machine_fingerprint,
    miss_reasons,
    package_versions,
    read_key_file,
    write_json,
)
from vitcompress.batch.manifest import Job, LoadedManifest, ManifestError
from vitcompress.batch.results import BatchResult, CacheInfo, FailOn, JobResult
from vitcompress.deploy.cpus import available_cpus
from vitcompress.deploy.timing_lock import DEFAULT_LOCK, LOCK_ENV, WAITS_ENV
from vitcompress.report import Report

log = logging.getLogger(__name__)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
KILL_GRACE_S = 10.0
POLL_S = 0.2
LOG_TAIL_LINES = 25


class Events(Protocol):
    """What a front end (the CLI's live table) hears while a batch runs; called from worker threads."""

    def started(self, name: str) -> None: ...

    def finished(self, result: JobResult) -> None: ...


@dataclass
class Options:
    out: Path
    parallel: int = 1
    resume: bool = True
    rerun_failed: bool = False
    shard: Optional[tuple[int, int]] = None
    cadence: Optional[str] = None
    fail_on: FailOn = "gate"
    lock_path: Path = field(default_factory=lambda: DEFAULT_LOCK)


class BatchInterrupted(Exception):
    """Ctrl-C or SIGTERM reached the batch: its running jobs were killed; finished ones stay cached."""

    def __init__(self, result: BatchResult, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.result, self.cause = result, cause


def thread_budget(parallel: int) -> int:
    """Threads per job so that ``parallel`` jobs × threads ≤ the cores this process may use."""
    cores = available_cpus()
    if parallel > cores:
        raise ManifestError(f"--jobs {parallel} exceeds the {cores} CPU cores available: each job needs at least "
                            f"one (jobs × threads ≤ cores)")
    return cores // parallel


def select(jobs: list[Job], shard: Optional[tuple[int, int]],
           cadence: Optional[str]) -> tuple[list[Job], list[JobResult]]:
    """(jobs to run, skipped results): the shard's share (every N-th job in name order, from the K-th) and, with
    a cadence, only the jobs that name it (or name none)."""
    if shard is not None:
        k, n = shard
        jobs = [job for i, job in enumerate(sorted(jobs, key=lambda j: j.name)) if i % n == k - 1]
    run, skipped = [], []
    for job in jobs:
        if cadence is None or job.cadence is None or cadence in job.cadence:
            run.append(job)
        else:
            skipped.append(JobResult(name=job.name, model=job.model, recipe=str(job.recipe_path), status="skipped",
                                     error=f"cadence {cadence} is not one of the job's: {', '.join(job.cadence)}"))
    return run, skipped


def run_batch(loaded: LoadedManifest, options: Options, events: Events | None = None) -> BatchResult:
    """Run (or take from the cache) every selected job; returns the :class:`BatchResult` (not yet written)."""
    threads = thread_budget(options.parallel)
    options = replace(options, out=options.out.resolve())
    started = time.monotonic()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    jobs, skipped = select(loaded.jobs, options.shard, options.cadence)
    jobs = [_capped(job, threads) for job in jobs]
    for result in skipped:
        _finish(events, result)
    options.out.mkdir(parents=True, exist_ok=True)
    with _batch_lock(options.out):
        return _run_locked(loaded, options, events, jobs, skipped, threads, started, date)


@contextlib.contextmanager
def _batch_lock(out: Path) -> Iterator[None]:
    """One batch at a time per output folder: what a killed batch left in it (a conversion's partial
    directory) is then known to be stale, and two batches never convert the same job at once."""
    lock = FileLock(out / ".batch.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise ManifestError(f"another vitcompress batch is running in {out}: wait for it, or choose another "
                            "--out") from None
    try:
        yield
    finally:
        lock.release()


def _run_locked(loaded: LoadedManifest, options: Options, events: Events | None, jobs: list[Job],
                skipped: list[JobResult], threads: int, started: float, date: str) -> BatchResult:
    """:func:`run_batch`'s work under the batch lock: every job in the pool, then the result."""
    stop = threading.Event()
    results: dict[str, JobResult] = {}
    interrupted = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=options.parallel) as pool:
        futures = {pool.submit(_run_job, job, threads, options, stop, events): job for job in jobs}
        pending = set(futures)
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5)
                for future in done:
                    results[futures[future].name] = future.result()
        except BaseException as exc:  # Ctrl-C, SIGTERM (the CLI raises it), or a bug: stop every job first
            stop.set()
            interrupted = exc
            for future in pending:
                future.cancel()
    if interrupted is not None:
        for future, job in futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                results[job.name] = future.result()
    order = {job.name: i for i, job in enumerate(loaded.jobs)}
    machine = {**machine_fingerprint(threads), "threads_per_job": threads}
    machine.pop("threads")
    batch = BatchResult(manifest=str(loaded.path), manifest_sha256=loaded.fingerprint, date=date, machine=machine,
                        versions=package_versions(), parallel_jobs=options.parallel,
                        shard=f"{options.shard[0]}/{options.shard[1]}" if options.shard else None,
                        cadence=options.cadence, wall_s=round(time.monotonic() - started, 2), fail_on=options.fail_on,
                        jobs=sorted([*results.values(), *skipped], key=lambda r: order[r.name]))
    if interrupted is not None:
        if isinstance(interrupted, Exception):
            raise interrupted
        raise BatchInterrupted(batch.finish(), interrupted)
    return batch.finish()


def _capped(job: Job, threads: int) -> Job:
    """The job with its recipe's ORT threads capped to the budget (stated in its overrides, so in its key)."""
    if job.recipe.validate_.threads <= threads:
        return job
    from vitcompress.recipe import load_recipe

    overrides = [*job.overrides, f"validate.threads={threads}"]
    return replace(job, overrides=overrides, recipe=load_recipe(job.recipe_path, overrides))


def plan(job: Job, record: dict, have_bundle: bool, options: Options) -> tuple[list[str], list[str]]:
    """(why convert, why re-measure): at most one is non-empty; both empty is a cache hit. Only the machine or
    the timing settings changed → re-measure, unless the job is a cascade (its latency comes from its
    conversion's own measurements: converted again)."""
    old = record.get("bundle") if have_bundle else None
    components = record["components"]
    reasons = miss_reasons(old, components)
    if not reasons and not options.resume:
        reasons = ["--no-resume: every job runs again"]
    if not reasons and options.rerun_failed and record.get("last_status") == "gate_failed":
        reasons = ["--rerun-failed: its gates failed last time"]
    latency = [] if reasons else latency_reasons(old, components)
    if latency and job.recipe.cascade is not None:
        return [f"{r}: a cascade's latency is measured inside its conversion, so it converts again"
                for r in latency], []
    return reasons, latency


def _run_job(job: Job, threads: int, options: Options, stop: threading.Event, events: Events | None) -> JobResult:
    job_dir = options.out / "jobs" / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    key_file, bundle = job_dir / "cache_key.json", job_dir / "bundle"
    components = job_components(job)
    key, latency_key = keys_of(components)
    record = read_key_file(key_file)
    record["components"] = components
    reasons, remeasure = plan(job, record, (bundle / "report.json").is_file(), options)
    shown = reasons or [f"{r}: latency re-measured" for r in remeasure]
    record.update(key=key, latency_key=latency_key, hit=not shown, reasons=shown, remeasured=bool(remeasure),
                  checked=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if shown:  # the bundle is about to change: until the job has finished, no record claims it
        record.pop("bundle", None)
        _remove_stale_partials(job_dir)
    write_json(key_file, record)
    log_file = job_dir / ("remeasure.log" if remeasure else "job.log")
    rel = {"bundle": str(bundle.relative_to(options.out)), "log": str(log_file.relative_to(options.out))}
    base = dict(name=job.name, model=job.model, recipe=str(job.recipe_path), threads=threads, log=rel["log"],
                cache=CacheInfo(hit=not shown, key=key, latency_key=latency_key, reasons=shown,
                                remeasured=bool(remeasure)))
    if events is not None:
        events.started(job.name)
    start = time.monotonic()
    if reasons or remeasure:
        cmd = command(job, bundle) if reasons else remeasure_command(job, bundle, "; ".join(shown))
        outcome = _run_process(cmd, job, threads, bundle, log_file, options.lock_path, stop)
        if "error" in outcome:
            result = JobResult(**base, duration_s=round(time.monotonic() - start, 2), **outcome)
            _finish(events, result)
            return result
        record.update(bundle=components, exit_code=outcome["exit_code"], latency_wait_s=_waited(job_dir))
    report = Report.load(bundle)
    gates = evaluate(job, report)
    failed = any(g.passed is False for g in gates)
    status = "gate_failed" if failed else ("passed" if reasons else "cached")
    record["last_status"] = "gate_failed" if failed else "passed"
    write_json(key_file, record)
    result = JobResult(**base, status=status, bundle=rel["bundle"], metrics=metrics(report), gates=gates,
                       duration_s=round(time.monotonic() - start, 2), exit_code=record.get("exit_code"),
                       latency_wait_s=record.get("latency_wait_s"))
    _finish(events, result)
    return result


def _remove_stale_partials(job_dir: Path) -> None:
    """Delete the work directories a killed conversion left in ``job_dir`` (the batch lock says none is live);
    a fine-tune checkpoint (``.bundle.partial-checkpoint``) is the conversion's own to keep or delete."""
    for stale in [*job_dir.glob(".bundle.partial-*"), *job_dir.glob(".bundle.old-*")]:
        if stale.name != ".bundle.partial-checkpoint":
            shutil.rmtree(stale, ignore_errors=True)


def _die_with_the_batch() -> None:
    """In the job's process, before it runs: Linux sends it SIGKILL when the batch dies (even by SIGKILL), so
    no conversion outlives its batch and races the resumed one."""
    if sys.platform == "linux":
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _finish(events: Events | None, result: JobResult) -> None:
    if events is not None:
        events.finished(result)


def command(job: Job, bundle: Path) -> list[str]:
    """The convert command line of a job."""
    return [sys.executable, "-m", "vitcompress", "convert", job.model, "--out", str(bundle), "--force",
            *_job_options(job)]


def remeasure_command(job: Job, bundle: Path, reason: str) -> list[str]:
    """The command line that times a job's finished bundle again (hidden ``vitcompress batch remeasure``)."""
    return [sys.executable, "-m", "vitcompress", "batch", "remeasure", str(bundle), job.model, "--reason", reason,
            *_job_options(job)]


def _job_options(job: Job) -> list[str]:
    """The options that name a job's recipe, overrides, weights, data and architecture (convert's spelling)."""
    cmd = ["--recipe", str(job.recipe_path), "--json"]
    for item in job.overrides:
        cmd += ["--set", item]
    if job.checkpoint is not None:
        cmd += ["--checkpoint", str(job.checkpoint)]
    if job.data is not None:
        cmd += ["--data", job.data]
    if job.random_init:
        cmd.append("--random-init")
    for name, value in job.model_args.items():
        cmd += ["--model-arg", f"{name}={json.dumps(value)}"]
    return cmd


def _run_process(cmd: list[str], job: Job, threads: int, bundle: Path, log_file: Path, lock: Path,
                 stop: threading.Event) -> dict:
    """Run the job's conversion (or re-measurement) ``cmd``: ``{exit_code}`` when it left a report, else the
    fields of an error or timeout result (status, exit_code, error, log_tail)."""
    waits = log_file.with_name("latency_lock.jsonl")
    waits.unlink(missing_ok=True)
    env = {**os.environ, **{name: str(threads) for name in THREAD_ENV}, WAITS_ENV: str(waits)}
    env.setdefault(LOCK_ENV, str(lock))
    with open(log_file, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_file.parent,
                                   start_new_session=True, preexec_fn=_die_with_the_batch)
        deadline = time.monotonic() + job.timeout
        ended = None
        while ended is None:
            try:
                ended = process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if stop.is_set() or time.monotonic() > deadline:
                    break
        _kill_group(process)
    tail = _tail(log_file)
    if ended is None:
        reason = "the batch was interrupted" if stop.is_set() else f"timed out after {job.timeout:g} s"
        return {"status": "error" if stop.is_set() else "timeout", "exit_code": process.returncode,
                "error": f"{reason}: its process group was killed", "log_tail": tail}
    if ended in (0, 1) and (bundle / "report.json").is_file():
        return {"exit_code": ended}
    return {"status": "error", "exit_code": ended, "error": _error_line(ended, tail), "log_tail": tail}


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the job's whole process group (convert cleans up its partial output), SIGKILL what remains."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        if grace is not None and process.poll() is None:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    process.wait()


def _error_line(code: int, tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    detail = errors[-1].removeprefix("error:").strip() if errors else (lines[-1] if lines else "no output")
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}: {detail}"
    kind = {2: "bad input", 70: "crashed", 130: "interrupted", 143: "terminated"}.get(code, f"exit code {code}")
    return f"{kind}: {detail}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _waited(job_dir: Path) -> Optional[float]:
    """Seconds the job's latency measurements waited for the lock (None: it measured none)."""
    try:
        records = [json.loads(line) for line in (job_dir / "latency_lock.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return None
    return round(sum(r["waited_s"] for r in records), 3)
