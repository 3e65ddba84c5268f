"""The installed `lmforge` command and the stage scripts: a mistake is one line on stderr and exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import make_model_dir


def test_bad_input_through_the_installed_command(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    lmforge = Path(sys.executable).parent / "lmforge"
    proc = subprocess.run([str(lmforge), "generate", "--model", str(model_dir), "--prompt", "the", "--top-p", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: sampling.top_p=2.0 must be in (0, 1] or null.\n"


def test_the_prepare_cli_exits_1_with_one_line_and_writes_nothing(project_root, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, "pipelines/prepare.py", f"data.sources=[{tmp_path}/missing.txt]",
         f"paths.prepared={out}", f"paths.reports={tmp_path}/reports"],
        cwd=project_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: data.sources path '{tmp_path}/missing.txt' does not exist; " \
                                  "fix the path in data.sources."
    assert not out.exists() and not (tmp_path / "reports").exists()
