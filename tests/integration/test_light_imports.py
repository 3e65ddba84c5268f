"""A package's ``__init__`` stays light: importing the corpus reader loads none of Ray, the tokenizer
engine, MLflow, torch or the engines (each checked in a fresh interpreter, where ``sys.modules`` shows
everything an import pulled in)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("ray", "tokenizers", "mlflow", "torch", "lmforge.engines")


def loaded_after(statement: str) -> set[str]:
    """The modules of ``HEAVY`` that ``statement`` leaves in ``sys.modules`` of a new interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(m for m in sys.modules if m in {HEAVY!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            cwd=ROOT)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import lmforge.corpus.reading",
                                       "from lmforge.corpus.reading import ReadOptions",
                                       "import lmforge.corpus.sources, lmforge.corpus.cleaning"])
def test_the_corpus_reader_imports_nothing_heavy(statement):
    assert loaded_after(statement) == set()


def test_the_check_can_see_a_heavy_import():
    # The same probe must be able to fail: the tokenize stage does load the tokenizer engine and the engines.
    assert loaded_after("import lmforge.tokenization.encode") == {"tokenizers", "lmforge.engines"}
