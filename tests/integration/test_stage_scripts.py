"""``python pipelines/<stage>.py`` puts ``pipelines/`` first on ``sys.path``, where ``tokenize.py``
hides the standard library's ``tokenize``. Run with ``-S`` (no ``.pth`` file of an installed
package imports the real one first, as one in the development environment did), a stage that
imports torch failed with "module 'tokenize' has no attribute 'open'" (first seen on a GPU machine)."""

from __future__ import annotations

import os
import site
import subprocess
import sys

from tests.helpers import ROOT


def test_a_stage_script_does_not_hide_standard_modules(tmp_path):
    path = os.pathsep.join([str(ROOT / "src"), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-S", "pipelines/check.py", f"paths.reports={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok: ")
    assert (tmp_path / "check.json").is_file()
