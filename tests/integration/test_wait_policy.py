"""OpenMP's wait policy, which lmforge sets before torch loads (``lmforge/__init__``), and what
``lmforge info`` says ``trainer.num_threads=auto`` resolves to, in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import BIN, run_command

SHOW = "import os, lmforge; print(os.environ.get('OMP_WAIT_POLICY'), lmforge.WAIT_POLICY)"


def python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_lmforge_makes_torchs_threads_sleep_when_they_wait():
    assert python(SHOW) == "PASSIVE passive"
    assert python("import lmforge.training.threads as t; print(t.wait_policy())") == "passive"


@pytest.mark.parametrize("users", ["ACTIVE", "passive"])
def test_a_policy_the_user_chose_is_kept(users):
    assert python(SHOW, OMP_WAIT_POLICY=users) == f"{users} {users.lower()}"


def test_after_an_earlier_import_torch_lmforge_says_the_threads_spin():
    assert python("import torch; " + SHOW) == "None active"


def test_info_says_what_auto_resolves_to_and_why(tmp_path):
    out = run_command([str(BIN / "lmforge"), "info", "--probe-seconds", "0"], tmp_path).stdout
    line = next(line for line in out.splitlines() if line.startswith("threads:"))
    assert "auto -> " in line and "for the baby, batch 12" in line and "measured now" in line and "ms" in line
    assert line.endswith("OpenMP wait policy passive")
    again = run_command([str(BIN / "lmforge"), "info", "--probe-seconds", "0"], tmp_path).stdout
    assert "remembered in" in again and line.split("(")[0] in again  # the same count, from the cache
