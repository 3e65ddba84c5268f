"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor fails it),
without a network (in a network namespace of its own), and its pages load nothing from another host."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_command
from tests.unit.test_docs_commands import DOCS, doc_pages

pytestmark = pytest.mark.slow

# Material prints a notice about MkDocs 2.0 on every run unless this is set.
QUIET = {"NO_MKDOCS_2_WARNING": "true"}
# A tag that makes the browser fetch something: a stylesheet, a script, an image, a font, a frame.
REMOTE_LOAD = re.compile(r"<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=\"(?:https?:)?//", re.I)


def offline() -> list[str]:
    """A prefix that runs a command in a network namespace of its own (no network at all), where
    the kernel allows one; elsewhere the remote-load check below still holds the site to it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net", "--map-root-user"]
    return []


def build(config: Path, site: Path):
    return run_command([*offline(), sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                        "--site-dir", str(site)], config.parent, check=False, timeout=300, env=QUIET)


def test_the_site_builds_strict_and_its_pages_load_nothing_from_the_network(tmp_path):
    site = tmp_path / "site"
    proc = build(ROOT / "mkdocs.yml", site)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for page in doc_pages()[1:]:  # docs/data.md -> site/data/index.html, docs/api/index.md -> site/api/index.html
        relative = page.relative_to(DOCS).with_suffix("")
        html = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        assert html.is_file(), f"{page} was not rendered ({html})"
    remote = [f"{p.relative_to(site)}: {m.group(0)}" for p in site.rglob("*.html")
              for m in REMOTE_LOAD.finditer(p.read_text(encoding="utf-8"))]
    assert not remote, "pages that would fetch from the network:\n" + "\n".join(remote[:20])
    # The API pages are rendered from the docstrings, not left as `::: lmforge.x` lines.
    api = (site / "api/corpus/index.html").read_text(encoding="utf-8")
    assert "::: lmforge" not in api and "prepare_stage" in api and "Stage 1, prepare" in api


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(DOCS, project / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    (project / "src").symlink_to(ROOT / "src")  # mkdocstrings reads the code from src/
    page = project / "docs/data.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [gone](gone.md) and [nowhere](training.md#nowhere).\n",
                    encoding="utf-8")
    proc = build(project / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "'gone.md'" in output and "'#nowhere'" in output, output[-3000:]
