"""The docs are a test: every shell command of README.md and of the site's pages (docs/, in the
order of mkdocs.yml's nav) runs here on a tiny configuration, or passes `lmforge check` with its
overrides, or (``make TARGET``) expands with ``make -n``.

How commands are found and which handler each gets (``HANDLERS``), the skip and file markers, and
the checks that run nothing (every command has a handler, every path the docs name exists) are in
``tests/unit/test_docs_commands.py``; this module runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_command, write_corpus
from tests.unit.test_docs_commands import Command, DocFile, all_commands, all_files, overrides_of, substituted

pytestmark = pytest.mark.slow


def write_doc_files(project: Path, files: list[DocFile], under: str = "") -> None:
    """Save the blocks the docs ask the reader to save (``<!-- readme-test: file: PATH -->``)."""
    for doc_file in files:
        if doc_file.path.startswith(under):
            target = project / doc_file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(doc_file.text, encoding="utf-8")


# --- checking: the overrides of a command, through `lmforge check` ---


def check_overrides(overrides: list[str], capsys) -> tuple[int, str]:
    from lmforge.cli.main import main

    try:
        main(["check", *overrides])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def checked_conf(tmp_path, monkeypatch) -> Path:
    """The project's conf/ and params.yaml, plus the config files the docs ask the reader to write."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    write_doc_files(tmp_path, all_files(), under="conf/")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_commands_that_need_gpus_nodes_or_full_size_pass_lmforge_check(checked_conf, capsys):
    checked = 0
    for command in all_commands():
        if command.handler != "check":
            continue
        for overrides in overrides_of(substituted(command)):
            code, output = check_overrides(overrides, capsys)
            assert code == 0, f"{command.where}: `{command.text}` fails `lmforge check`:\n{output}"
            assert output.startswith("ok: ")
            checked += 1
    assert checked >= 10


def test_a_data_config_of_the_docs_is_what_the_checks_compose(checked_conf):
    """`-S data=NAME` picks the data config "Your data" shows, as written, and it has no key the
    default corpus's config lacks (an unknown key is refused by every stage)."""
    import yaml

    from lmforge.config.compose import compose_config

    files = [f for f in all_files() if f.path.startswith("conf/data/")]
    assert files, "docs/data.md no longer shows a data config marked `<!-- readme-test: file: conf/data/... -->`"
    default = set(compose_config([]).data)
    for doc_file in files:
        cfg = compose_config([f"data={Path(doc_file.path).stem}"])
        assert list(cfg.data.sources) == yaml.safe_load(doc_file.text)["sources"], doc_file.where
        assert set(cfg.data) <= default, f"{doc_file.where}: keys no stage reads: {sorted(set(cfg.data) - default)}"


def test_make_targets_exist():
    for command in all_commands():
        if command.handler == "dry-run" and not command.skip:
            words = command.words
            run_command(["make", "-n", *[w for w in words[1:] if "=" not in w]], ROOT)


# --- running: the rest, as written, in one tiny project ---


def setup_files(project: Path, home: Path) -> None:
    """What the docs' commands take for granted: a user's books, some texts to evaluate, the files
    the docs ask the reader to write."""
    write_corpus(home / "my_books", n_docs=3, words=80)
    write_corpus(project / "my_texts", n_docs=2, words=40)
    (project / "other.txt").write_text("ROMEO. What light through yonder window breaks?\n", encoding="utf-8")
    bpe_llama_model_dir(project)
    write_doc_files(project, all_files())


def bpe_llama_model_dir(project: Path) -> Path:
    """What `dvc exp run -S tokenizer=bpe` leaves in models/gpt, at tiny size: a Llama-style model
    (the default's family) with a byte-level BPE vocabulary trained on the project's train split."""
    import torch

    from lmforge.model.directory import save_model_dir
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenization.tokenizer import save_tokenizer
    from lmforge.tokenization.vocab import build_tokenizer

    text = (project / "data/prepared/train.txt").read_text(encoding="utf-8")[:200_000]
    tokenizer = build_tokenizer({"kind": "bpe", "vocab_size": 300, "special_tokens": ["<|endoftext|>"]}, [text])
    save_tokenizer(tokenizer, project / "bpe-tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=64, n_layer=2, n_head=2, n_embd=32,
                          positions="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    return save_model_dir(project / "models/gpt-bpe", model, project / "bpe-tokenizer.json",
                          {"kind": "bpe", "eot_token": "<|endoftext|>",
                           "eot_id": tokenizer.token_to_id("<|endoftext|>")})


@pytest.fixture(scope="module")
def docs_project(dvc_project, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny-pipeline project (the shared one stays as it is) and a home directory."""
    base = tmp_path_factory.mktemp("docs")
    project = base / "project"
    shutil.copytree(dvc_project, project, symlinks=True)
    home = base / "home"
    home.mkdir()
    setup_files(project, home)
    return project, home


def shown_output(command: Command) -> str | None:
    """The output a page shows for a one-line command: the `# ok: ...` line right after it."""
    lines = (ROOT / command.page).read_text(encoding="utf-8").splitlines()
    shown = lines[command.line] if command.line < len(lines) else ""
    return shown[2:] if shown.startswith("# ok: ") else None


def test_runnable_commands_run_as_written(docs_project):
    project, home = docs_project
    run_id = json.loads((project / "models/gpt/run.json").read_text())["run_id"]
    ran = 0
    for command in all_commands():
        if command.handler != "run" or command.skip:
            continue
        # stdin from /dev/null: `generate --interactive` reads to the end of its input and quits.
        proc = run_command(["bash", "-c", "exec </dev/null\n" + substituted(command, run_id).text], project,
                           check=False, timeout=300,
                           env={"HOME": str(home), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
        assert proc.returncode == 0, (f"{command.where}: `{command.text}` failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        if (shown := shown_output(command)) is not None:
            assert proc.stdout.strip() == shown, f"{command.where}: the page shows another output"
        ran += 1
    assert ran >= 12
