"""The README is a test: every shell command in its ```bash, ```sh and ```console blocks either
runs here, on a tiny configuration, or is passed through `lmforge check` with its overrides.

How a command is handled is decided by its first words (``HANDLERS``, first match wins):

- ``run``: executed with bash, as written (after ``SUBSTITUTIONS``), in a copy of the project
  that has been through the tiny pipeline (``conftest.dvc_project``), one shared copy for the
  whole README, commands in README order; it must exit 0.
- ``check``: a command that trains or runs the pipeline at full size, on GPUs or on a cluster
  (``dvc exp run -S``, ``python pipelines/train.py``, ``torchrun``, ``srun``): its overrides go
  through ``lmforge check`` (a grid ``-S 'a=1,2'`` is expanded), which must pass.
- ``dry-run``: ``make TARGET`` is run as ``make -n TARGET`` in the project (the target exists and
  its recipe expands; running it is the whole pipeline or the whole suite).

A command no handler knows fails the test. A block that must not run (it needs a server, a
bucket or a remote elsewhere) has the line ``<!-- readme-test: skip: REASON -->`` immediately
before it; its commands are then not run, but those a ``check`` handler knows are still checked.
To cover a new README command, add its first words to ``HANDLERS`` (and any setup it needs to
``SETUP``), or mark its block with the reason it cannot run here.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_command, write_corpus

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
SKIP_MARKER = re.compile(r"^<!-- readme-test: skip: (.+\S) -->$")
SHELLS = ("bash", "sh", "console")

# First words -> handler. "run": bash in the tiny project; "check": overrides through
# `lmforge check`; "dry-run": `make -n`.
HANDLERS: list[tuple[str, str]] = [
    ("make ", "dry-run"),
    ("dvc exp run", "check"),
    ("python pipelines/", "check"),
    ("torchrun ", "check"),
    ("srun ", "check"),
    ("lmforge prepare", "check"), ("lmforge vocab", "check"), ("lmforge tokenize", "check"),
    ("lmforge train", "check"),
    ("lmforge check", "run"),
    ("lmforge info", "run"),
    ("lmforge compose", "run"),
    ("lmforge generate", "run"),
    ("lmforge evaluate --model", "run"),
    ("lmforge export", "run"),
    ("lmforge import", "run"),
    ("lmforge runs", "run"),
    ("python -c ", "run"),
    ("dvc exp show", "run"),
    ("dvc queue status", "run"),
    ("dvc add ", "run"),
    ("git add ", "run"),
    ("mkdir ", "run"),
    ("cp ", "run"),
]

# README placeholders -> what they stand for in the tiny project.
SUBSTITUTIONS = {
    "<run_id>": "{run_id}",
    "path/to/local-transformers-model": "exports/gpt-hf",  # the export a few lines above
    "model.n_layer=...": "model=tiny",  # "the command `import` prints": the tiny model's settings
    # The GGUF section first retrains with tokenizer=bpe (checked, not run): its model stands in.
    "--model models/gpt --format gguf": "--model models/gpt-bpe --format gguf",
}


@dataclass
class Command:
    text: str  # one command as bash reads it: continuation lines joined (comments are bash's to drop)
    line: int  # where it starts in README.md
    skip: str | None  # the reason of the block's skip marker, if any

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def handler(self) -> str | None:
        plain = " ".join(self.words)
        return next((how for prefix, how in HANDLERS if plain.startswith(prefix)), None)


def readme_commands(text: str) -> list[Command]:
    """Every shell command of the README's bash/sh/console blocks, in order."""
    commands, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        marker = SKIP_MARKER.match(lines[i - 1].strip()) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELLS:
            commands += block_commands(lines[i + 1 : end], i + 2, fence.group(1) == "console",
                                       marker.group(1) if marker else None)
        i = end + 1
    return commands


def block_commands(body: list[str], first_line: int, console: bool, skip: str | None) -> list[Command]:
    commands, pending, start = [], "", 0
    for number, raw in enumerate(body, first_line):
        line = raw
        if console and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if not pending:
            start = number
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if pending.endswith("\\"):  # bash drops a backslash-newline, inside double quotes too
            pending = pending[:-1] + line
        else:
            pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append(Command(pending.strip(), start, skip))
        pending = ""
    return commands


def test_the_readme_has_commands_and_every_one_has_a_handler():
    commands = readme_commands(README.read_text())
    assert len(commands) > 20
    unknown = [f"README.md:{c.line}: {c.text[:80]}" for c in commands if c.handler is None and not c.skip]
    assert not unknown, "README commands that neither run nor pass `lmforge check` (add a handler in " \
                        "tests/test_readme.py or a `<!-- readme-test: skip: REASON -->` marker):\n" + "\n".join(unknown)


def test_a_grid_splits_on_commas_outside_brackets():
    assert split_values("tiny,baby") == ["tiny", "baby"]
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]


def test_the_extraction_joins_continuations_and_drops_comments():
    text = "x\n<!-- readme-test: skip: a server -->\n```bash\n# note\nlmforge check a=1 \\\n    b=2   # why\n" \
           "curl -d '{\n  \"k\": 1}'\n```\n```console\n$ lmforge runs show\nrun abc\n```\n"
    commands = readme_commands(text)
    assert [c.words for c in commands] == [["lmforge", "check", "a=1", "b=2"], ["curl", "-d", '{\n  "k": 1}'],
                                           ["lmforge", "runs", "show"]]
    assert commands[0].skip == "a server" and commands[2].skip is None


# --- checking: the overrides of a command, through `lmforge check` ---


def overrides_of(command: Command) -> list[list[str]]:
    """The override lists a command would run with (one per point of a `-S` grid)."""
    words = command.words
    if words[:3] == ["dvc", "exp", "run"]:
        axes = [words[i + 1] for i, w in enumerate(words) if w in ("-S", "--set-param")]
        grid = [[f"{key}={value}" for value in split_values(values)] for key, values in (a.split("=", 1) for a in axes)]
        return [list(point) for point in itertools.product(*grid)]
    if words[0] == "lmforge":
        return [words[2:]]
    script = next(i for i, w in enumerate(words) if w.startswith("pipelines/"))
    return [[w for w in words[script + 1 :] if "=" in w]]


def split_values(values: str) -> list[str]:
    """Hydra's sweep syntax `a,b` (commas outside brackets) as a list of values."""
    parts, depth, current = [], 0, ""
    for ch in values:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def check_overrides(overrides: list[str], capsys) -> tuple[int, str]:
    from lmforge.cli.main import main

    try:
        main(["check", *overrides])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_commands_that_need_gpus_nodes_or_full_size_pass_lmforge_check(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # conf/ as the project has it
    checked = 0
    for command in readme_commands(README.read_text()):
        if command.handler != "check":
            continue
        text = command.text
        for placeholder, value in SUBSTITUTIONS.items():
            text = text.replace(placeholder, value)
        for overrides in overrides_of(Command(text, command.line, command.skip)):
            code, output = check_overrides(overrides, capsys)
            assert code == 0, f"README.md:{command.line}: `{command.text}` fails `lmforge check`:\n{output}"
            assert output.startswith("ok: ")
            checked += 1
    assert checked >= 10


def test_make_targets_exist():
    for command in readme_commands(README.read_text()):
        if command.handler == "dry-run" and not command.skip:
            words = command.words
            run_command(["make", "-n", *[w for w in words[1:] if "=" not in w]], ROOT)


# --- running: the rest, as written, in one tiny project ---


def setup_files(project: Path, home: Path) -> None:
    """What the README's commands take for granted: a user's books, some texts to evaluate."""
    write_corpus(home / "my_books", n_docs=3, words=80)
    write_corpus(project / "my_texts", n_docs=2, words=40)
    (project / "other.txt").write_text("ROMEO. What light through yonder window breaks?\n", encoding="utf-8")
    bpe_llama_model_dir(project)


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
def readme_project(dvc_project, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny-pipeline project (the shared one stays as it is) and a home directory."""
    base = tmp_path_factory.mktemp("readme")
    project = base / "project"
    shutil.copytree(dvc_project, project, symlinks=True)
    home = base / "home"
    home.mkdir()
    setup_files(project, home)
    return project, home


def test_runnable_commands_run_as_written(readme_project):
    project, home = readme_project
    run_id = json.loads((project / "models/gpt/run.json").read_text())["run_id"]
    lines = README.read_text().splitlines()
    ran = 0
    for command in readme_commands(README.read_text()):
        if command.handler != "run" or command.skip:
            continue
        text = command.text
        for placeholder, value in SUBSTITUTIONS.items():
            text = text.replace(placeholder, value.format(run_id=run_id))
        # stdin from /dev/null: `generate --interactive` reads to the end of its input and quits.
        proc = run_command(["bash", "-c", "exec </dev/null\n" + text], project, check=False, timeout=300,
                           env={"HOME": str(home), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
        assert proc.returncode == 0, (f"README.md:{command.line}: `{command.text}` failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        shown = lines[command.line]  # the line after a one-line command: `# ok: ...` is its output
        if shown.startswith("# ok: "):
            assert proc.stdout.strip() == shown[2:], f"README.md:{command.line + 1} shows another output"
        ran += 1
    assert ran >= 12
