"""A full disk (here: a file size limit, RLIMIT_FSIZE, on the convert process) is one clear ``error:`` line, exit
code 2 and no partial bundle, whichever writer hits it (the ONNX exporter, numpy's golden files)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
RECIPE = """
steps:
  - {transform: svd_lowrank, targets: ["re:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc[12]"], rank_ratio: 0.5}
validate: {images: 16, batch_sizes: [1], latency_runs: 3, warmup_runs: 0, profile_runs: 0, threads: 1}
"""


def test_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path):
    """1.5 MB: the ONNX files fit, numpy's golden inputs do not (a short write, no errno: the hardest case; a
    smaller limit fails in the ONNX writer with EFBIG, the plain OSError case)."""
    limit = 1_500_000
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "keep").mkdir()

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "vitcompress", "convert", "test_vit", "--random-init", "--model-arg", "depth=1",
         "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "keep/new/bundle")],
        preexec_fn=limit_file_size, capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert errors[0].startswith("error: cannot write the output: ") and "nothing was written" in errors[0]
    assert "Traceback" not in done.stderr and list((tmp_path / "keep").iterdir()) == []
