"""pyproject.toml's lower bounds admit no version that lacks an API the code calls."""

from __future__ import annotations

import inspect
import re

from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import ROOT

# (package, the text the code uses, the release that introduced it: the project's changelog).
INTRODUCED = [
    ("lightning", "enable_autolog_hparams=", "2.5.2"),  # Lightning-AI/pytorch-lightning#20593
    ("lightning", "ckpt_path=ckpt_path, weights_only=", "2.6.0"),  # Trainer.fit(weights_only=...), #21072
]


def floor(package: str) -> Version:
    text = (ROOT / "pyproject.toml").read_text()
    for line in re.findall(r'^\s*"([^"]+)"', text, flags=re.M):
        requirement = Requirement(line)
        if requirement.name == package:
            lows = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
            assert lows, f"{package} has no lower bound in pyproject.toml"
            return max(lows)
    raise AssertionError(f"{package} is not a dependency in pyproject.toml")


def test_floors_cover_the_apis_the_code_calls():
    code = "\n".join(p.read_text() for p in (ROOT / "src/lmforge").rglob("*.py"))
    for package, usage, introduced in INTRODUCED:
        assert usage in code, f"the code no longer uses {usage!r}: drop it from INTRODUCED"
        assert floor(package) >= Version(introduced), (
            f"the code uses {usage!r} ({package} {introduced}) but pyproject.toml allows {package}>={floor(package)}")


def test_the_installed_lightning_has_them():
    import lightning as L

    assert "enable_autolog_hparams" in inspect.signature(L.Trainer).parameters
    assert "weights_only" in inspect.signature(L.Trainer.fit).parameters
