"""What a batch writes for CI systems: ``junit.xml`` (junitparser), ``summary.md`` and GitHub annotations.

JUnit: one testsuite per job, a testcase ``convert`` (an ``<error>`` with the error line and the log tail when
the job crashed or timed out) and one testcase per gate (``<failure message="top-1 drop 2.7 > 2">``), the
job's metrics as suite properties. Every CI system with a JUnit reader (GitHub via an action, GitLab's
``artifacts:reports:junit``, Jenkins, Azure) shows which gate failed by how much, without hiding the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from vitcompress.batch.results import BatchResult, JobResult
from vitcompress.files import replace_text
from vitcompress.page.index_page import JobRow, job_page, write_index

STATUS_MARK = {"passed": "✅ passed", "cached": "✅ cached", "gate_failed": "❌ gate failed", "error": "💥 error",
               "timeout": "⏱ timeout", "skipped": "⏭ skipped"}


def junit(batch: BatchResult) -> JUnitXml:
    xml = JUnitXml(name="vitcompress batch")
    for job in batch.jobs:
        suite = TestSuite(f"vitcompress.{job.name}")
        suite.add_property("model", job.model)
        suite.add_property("recipe", job.recipe)
        suite.add_property("status", job.status)
        if job.cache is not None:
            suite.add_property("cache", "hit" if job.cache.hit else "miss: " + "; ".join(job.cache.reasons))
        for name, value in (job.metrics or {}).items():
            if value is not None:
                suite.add_property(name, f"{value:.6g}" if isinstance(value, float) else str(value))
        convert = TestCase("convert", classname=f"vitcompress.{job.name}", time=job.duration_s)
        if job.status in ("error", "timeout"):
            error = Error(job.error or job.status, "timeout" if job.status == "timeout" else "error")
            error.text = job.log_tail or ""
            convert.result = [error]
        elif job.status == "skipped":
            convert.result = [Skipped(job.error or "skipped")]
        if job.log:
            convert.system_out = f"log: {job.log}"
        suite.add_testcase(convert)
        for gate in job.gates:
            case = TestCase(f"gate {gate.label}", classname=f"vitcompress.{job.name}", time=0.0)
            if gate.passed is False:
                case.result = [Failure(gate.message, gate.gate)]
            elif gate.passed is None:
                case.result = [Skipped(gate.message)]
            suite.add_testcase(case)
        suite.update_statistics()
        xml.add_testsuite(suite)
    xml.update_statistics()
    return xml


def _number(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def summary(batch: BatchResult) -> str:
    """Markdown: a headline, one compact row per job, then the details of every job that did not pass, folded."""
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in batch.counts.items() if n)
    lines = [f"### vitcompress batch: {counts} — exit code {batch.exit_code}", "",
             f"{len(batch.jobs)} jobs{f', shard {batch.shard}' if batch.shard else ''}, {batch.parallel_jobs} in "
             f"parallel × {batch.machine.get('threads_per_job')} threads on {batch.machine.get('cpu')} "
             f"({batch.machine.get('cores')} cores), {batch.wall_s:.0f} s", "",
             *(f"- shard {r.shard}: {r.machine.get('cpu')}, {r.machine.get('cores')} cores, "
               f"{', '.join(f'{k} {v}' for k, v in r.versions.items())}" for r in batch.shards),
             *([f"**Missing shards {', '.join(batch.missing_shards)}: their jobs are not in this result.**", ""]
               if batch.missing_shards else [""] if batch.shards else []),
             "| job | status | s | speed-up b1 | top-1 drop | agreement | failed gates |",
             "|---|---|---:|---:|---:|---:|---|"]
    for job in batch.jobs:
        m = job.metrics or {}
        failed = "; ".join(g.message for g in job.failed_gates) or (job.error or "" if job.status != "skipped" else "")
        lines.append(f"| {job.name} | {STATUS_MARK[job.status]} | {job.duration_s:.0f} | "
                     f"{_number(m.get('speedup_b1'), '.2f')} | {_number(m.get('top1_drop'), '.2f')} | "
                     f"{_number(m.get('agreement'), '.4f')} | {failed.replace('|', '/')} |")
    for job in batch.jobs:
        if job.status in ("passed", "cached", "skipped"):
            continue
        lines += ["", f"<details><summary>{job.name}: {STATUS_MARK[job.status]}</summary>", ""]
        lines += [f"- {g.message} ({g.source})" for g in job.failed_gates]
        if job.error:
            lines.append(f"- {job.error}")
        if job.log:
            lines.append(f"- log: `{job.log}`")
        if job.log_tail:
            lines += ["", "```", job.log_tail, "```"]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def annotations(batch: BatchResult) -> list[str]:
    """GitHub Actions ``::error`` workflow commands, one per failed job (shown on the run's page)."""
    result = []
    for job in batch.jobs:
        messages = [g.message for g in job.failed_gates] or ([job.error] if job.status in ("error", "timeout") else [])
        if messages:
            text = "; ".join(m or job.status for m in messages)
            result.append(f"::error title=vitcompress batch {job.name} ({job.status})::{_escape(text)}")
    return result


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def index_rows(batch: BatchResult, out: Path) -> list[JobRow]:
    """index.html's row of each job (its page linked relative to ``out``, where batch.json's paths start)."""
    rows = []
    for job in batch.jobs:
        m = job.metrics or {}
        rows.append(JobRow(
            name=job.name, model=job.model, recipe=job.recipe, status=job.status,
            passed=job.status in ("passed", "cached"), speedup=m.get("speedup_b1"), drop=m.get("top1_drop"),
            agreement=m.get("agreement"), page=job_page(out, job.bundle),
            failed="; ".join(g.message for g in job.failed_gates) or job.error or ""))
    return rows


def write_outputs(batch: BatchResult, out: Path) -> list[Path]:
    """batch.json, junit.xml, summary.md and index.html (every job's report.html linked) in ``out`` (and
    summary.md appended to $GITHUB_STEP_SUMMARY)."""
    out.mkdir(parents=True, exist_ok=True)
    batch.dump(out / "batch.json")
    xml = out / f".junit.xml.{os.getpid()}.tmp"  # each file written whole or not at all (a killed batch)
    junit(batch).write(str(xml), pretty=True)
    xml.replace(out / "junit.xml")
    text = summary(batch)
    replace_text(out / "summary.md", text)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as file:
            file.write(text)
    heading = (f"{batch.manifest} · {batch.date} · {len(batch.jobs)} jobs, {batch.parallel_jobs} in parallel · exit "
               f"code {batch.exit_code}")
    return [out / "batch.json", out / "junit.xml", out / "summary.md",
            write_index(index_rows(batch, out), heading, out)]


def job_line(job: JobResult) -> str:
    """One plain line per finished job (logs without a terminal)."""
    detail = "; ".join(g.message for g in job.failed_gates) or job.error or ""
    cache = " (cached)" if job.cache is not None and job.cache.hit and job.status != "cached" else ""
    return f"{job.name}: {job.status}{cache} in {job.duration_s:.0f} s{f': {detail}' if detail else ''}"
