"""What the accuracy ladder and report.html add to a default conversion's wall time (docs/report.md).

Runs ``make demo``'s conversion (vit_fmnist, recipes/svd.yaml, Fashion-MNIST, every default) once through the API
with a progress object that timestamps every stage boundary. The ladder's work is the intervals that start at its
own stage events — ``ladder`` (the transformed model's pass in the transform stage, then the ladder stage's
rungs), ``end-to-end`` and ``page`` — each until the next stage event (or the end of the run); the overhead is
their sum over the rest of the run. Writes bench/report_overhead.json (date, CPU, threads, seconds per part).

    python bench/report_overhead.py [--out bench/report_overhead.json] [--bundle runs/demo]

``--bundle`` keeps the conversion's output there (the README's screenshot is taken of it); by default it goes to
a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import vitcompress
from vitcompress.measure import machine_description
from vitcompress.progress import LogProgress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pages import source_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LADDER_STAGES = ("ladder", "end-to-end", "page")


class StageClock(LogProgress):
    """LogProgress that also records (time, stage name) at every stage boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[float, str]] = []

    def stage(self, name: str, description: str) -> None:
        self.events.append((time.perf_counter(), name))
        super().stage(name, description)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "report_overhead.json")
    parser.add_argument("--bundle", type=Path, help="keep the conversion's output here (replaced if a bundle)")
    args = parser.parse_args()
    commit = source_commit()  # before this run rewrites its results file
    clock = StageClock()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = vitcompress.convert("vit_fmnist", ROOT / "recipes" / "svd.yaml", out_dir=args.bundle or
                                     Path(tmp) / "demo", progress=clock, force=args.bundle is not None)
        end = time.perf_counter()
        page_bytes = (result.out_dir / "report.html").stat().st_size
    seconds: dict[str, float] = {name: 0.0 for name in LADDER_STAGES}
    for (at, name), (until, _) in zip(clock.events, [*clock.events[1:], (end, "")]):
        if name in seconds:
            seconds[name] += until - at
    total = end - start
    overhead = sum(seconds.values())
    report = result.report
    record = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(), "cpus": os.cpu_count(),
        "threads": report.validation.threads, "commit": commit, "load_average_1min": os.getloadavg()[0],
        "conversion": "vit_fmnist, recipes/svd.yaml, Fashion-MNIST (make demo)",
        "validation_images": report.validation.images, "ladder_images": report.explain.ladder.images,
        "wall_s": total, "ladder_and_page_s": overhead, "without_s": total - overhead,
        "overhead": overhead / (total - overhead), "seconds": seconds,
        "rungs_s": {rung.name: rung.seconds for rung in report.explain.ladder.rungs},
        "report_html_bytes": page_bytes}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
