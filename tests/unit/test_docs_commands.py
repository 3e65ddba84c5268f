"""The docs are a test: how their shell commands are found and handled, and what they may name.

Every shell command in the ```bash, ```sh and ```console blocks of ``README.md`` and of the site's
pages (``docs/``, in the order of ``mkdocs.yml``'s nav) is either run or checked by
``tests/e2e/test_readme.py``. How a command is handled is decided by its first words
(``HANDLERS``, first match wins):

- ``run``: executed with bash, as written (after ``SUBSTITUTIONS``), in a copy of the project
  that has been through the tiny pipeline (``conftest.dvc_project``), one shared copy for all the
  pages, commands in reading order; it must exit 0.
- ``check``: a command that trains or runs the pipeline at full size, on GPUs or on a cluster
  (``dvc exp run -S``, ``python pipelines/train.py``, ``torchrun``, ``srun``): its overrides go
  through ``lmforge check`` (a grid ``-S 'a=1,2'`` is expanded), which must pass.
- ``dry-run``: ``make TARGET`` is run as ``make -n TARGET`` in the project (the target exists and
  its recipe expands; running it is the whole pipeline or the whole suite).

A command no handler knows fails the test. A block that must not run (it needs a server, a
bucket or a remote elsewhere) has the line ``<!-- readme-test: skip: REASON -->`` immediately
before it; its commands are then not run, but those a ``check`` handler knows are still checked.
A block the docs ask the reader to save as a file (a data config) has
``<!-- readme-test: file: PATH -->`` immediately before it: the test writes it at PATH in the
project before the commands run, and into the ``conf/`` the checks compose.
To cover a new command, add its first words to ``HANDLERS`` (and any setup it needs to
``setup_files`` in the e2e test), or mark its block with the reason it cannot run here.

This module holds the parser (the e2e test imports it) and the checks that need nothing run: every
command has a handler, every marker sits on a block, every page is in the nav, and every path and
``lmforge`` module the docs name exists.
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200
MARKER = re.compile(r"^<!-- readme-test: (skip|file): (.+\S) -->$")
FENCE = re.compile(r"^```(\w+)\s*$")
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

# Placeholders in the docs -> what they stand for in the tiny project.
SUBSTITUTIONS = {
    "<run_id>": "{run_id}",
    "path/to/local-transformers-model": "exports/gpt-hf",  # the export a few lines above
    "model.n_layer=...": "model=tiny",  # "the command `import` prints": the tiny model's settings
    # The GGUF section first retrains with tokenizer=bpe (checked, not run): its model stands in.
    "--model models/gpt --format gguf": "--model models/gpt-bpe --format gguf",
}

# Dotted names in the docs that are keys (MLflow tags, GGUF metadata, API fields), not modules.
KEYS_NOT_MODULES = {
    "lmforge.git_dirty", "lmforge.dvc_experiment", "lmforge.hashes_from", "lmforge.git_commit",
    "lmforge.corpus.md5", "lmforge.tokenizer.md5", "lmforge.tokens.md5", "lmforge.mlflow.run_id",
    "lmforge.mlflow.experiment_id",
    "lmforge.chat_template", "lmforge.attempts", "lmforge.attempt",
    "lmforge.base.ref", "lmforge.base.revision", "lmforge.base.source", "lmforge.base.kind",
    "lmforge.base.files_sha256",
}
# Paths the docs name that are outputs, not files of the repository.
OUTPUT_PATHS = {"benchmarks/results/"}
CHECKED_PREFIXES = ("src/", "tests/", "conf/", "benchmarks/", "pipelines/", "docs/", ".ci/")


@dataclass
class Command:
    text: str  # one command as bash reads it: continuation lines joined (comments are bash's to drop)
    page: str  # the file it is in, relative to the project root
    line: int  # where it starts in that file
    skip: str | None  # the reason of the block's skip marker, if any

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def handler(self) -> str | None:
        plain = " ".join(self.words)
        return next((how for prefix, how in HANDLERS if plain.startswith(prefix)), None)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class DocFile:
    path: str  # where the docs ask the reader to save it, relative to the project
    text: str
    where: str


def nav_pages(nav) -> list[str]:
    """The Markdown files of mkdocs.yml's nav, in reading order."""
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def doc_pages() -> list[Path]:
    """README.md, then every page of the site in the order of its nav."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    return [README, *(DOCS / page for page in nav_pages(nav))]


def blocks(text: str):
    """(language, first line number, body lines, marker) of each fenced block with a language."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        yield fence.group(1), i + 2, lines[i + 1 : end], marker
        i = end + 1


def page_commands(text: str, page: str = "README.md") -> list[Command]:
    """Every shell command of a page's bash/sh/console blocks, in order."""
    commands = []
    for language, first_line, body, marker in blocks(text):
        if language in SHELLS:
            skip = marker.group(2) if marker and marker.group(1) == "skip" else None
            commands += block_commands(body, first_line, language == "console", skip, page)
    return commands


def page_files(text: str, page: str = "README.md") -> list[DocFile]:
    """The blocks a page asks the reader to save as files (``<!-- readme-test: file: PATH -->``)."""
    return [DocFile(marker.group(2), "\n".join(body) + "\n", f"{page}:{first_line}")
            for _, first_line, body, marker in blocks(text) if marker and marker.group(1) == "file"]


def block_commands(body: list[str], first_line: int, console: bool, skip: str | None, page: str) -> list[Command]:
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
        commands.append(Command(pending.strip(), page, start, skip))
        pending = ""
    return commands


def all_commands() -> list[Command]:
    return [c for path in doc_pages() for c in page_commands(path.read_text(encoding="utf-8"), relative(path))]


def all_files() -> list[DocFile]:
    return [f for path in doc_pages() for f in page_files(path.read_text(encoding="utf-8"), relative(path))]


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def substituted(command: Command, run_id: str = "RUN_ID") -> Command:
    text = command.text
    for placeholder, value in SUBSTITUTIONS.items():
        text = text.replace(placeholder, value.format(run_id=run_id))
    return Command(text, command.page, command.line, command.skip)


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


# --- the parser ---


def test_a_grid_splits_on_commas_outside_brackets():
    assert split_values("tiny,baby") == ["tiny", "baby"]
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]


def test_the_extraction_joins_continuations_and_drops_comments():
    text = "x\n<!-- readme-test: skip: a server -->\n```bash\n# note\nlmforge check a=1 \\\n    b=2   # why\n" \
           "curl -d '{\n  \"k\": 1}'\n```\n```console\n$ lmforge runs show\nrun abc\n```\n"
    commands = page_commands(text)
    assert [c.words for c in commands] == [["lmforge", "check", "a=1", "b=2"], ["curl", "-d", '{\n  "k": 1}'],
                                           ["lmforge", "runs", "show"]]
    assert commands[0].skip == "a server" and commands[2].skip is None
    assert [c.line for c in commands] == [5, 7, 11]


def test_a_file_marker_names_the_block_after_it_and_is_not_a_skip():
    text = "<!-- readme-test: file: conf/data/x.yaml -->\n```yaml\nsources: [a]\nsplit: document\n```\n" \
           "<!-- readme-test: file: run.sh -->\n```bash\nlmforge check data=x\n```\n"
    assert [(f.path, f.text) for f in page_files(text, "p.md")] == [
        ("conf/data/x.yaml", "sources: [a]\nsplit: document\n"), ("run.sh", "lmforge check data=x\n")]
    assert [c.skip for c in page_commands(text)] == [None]


def test_a_placeholder_becomes_the_tiny_projects_value():
    command = substituted(Command("lmforge generate --model runs:/<run_id>/model", "p.md", 1, None), "abc")
    assert command.words == ["lmforge", "generate", "--model", "runs:/abc/model"]
    grid = Command("dvc exp run --queue -S 'model=tiny,baby' -S 'optimizer.lr=1e-3,3e-4'", "p.md", 1, None)
    assert overrides_of(grid) == [["model=tiny", "optimizer.lr=1e-3"], ["model=tiny", "optimizer.lr=3e-4"],
                                  ["model=baby", "optimizer.lr=1e-3"], ["model=baby", "optimizer.lr=3e-4"]]


# --- the docs as they are ---


def test_the_docs_have_commands_and_every_one_has_a_handler():
    commands = all_commands()
    assert len(commands) > 20
    assert {c.page for c in commands} > {"README.md", "docs/data.md", "docs/interop.md"}
    unknown = [f"{c.where}: {c.text[:80]}" for c in commands if c.handler is None and not c.skip]
    assert not unknown, "commands that neither run nor pass `lmforge check` (add a handler in " \
                        "tests/unit/test_docs_commands.py or a `<!-- readme-test: skip: REASON -->` marker):\n" + \
                        "\n".join(unknown)


def test_every_marker_sits_right_above_a_block():
    loose = []
    for path in doc_pages():
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not (line.strip().startswith("<!--") and "readme-test" in line):
                continue
            if not (MARKER.match(line.strip()) and number < len(lines) and FENCE.match(lines[number])):
                loose.append(f"{relative(path)}:{number}: {line.strip()}")
    assert not loose, "markers that apply to nothing (a marker goes on the line right above a ```LANG fence):\n" + \
                      "\n".join(loose)


def test_every_page_is_in_the_nav_and_every_package_has_an_api_page():
    in_nav = {p.relative_to(DOCS).as_posix() for p in doc_pages()[1:]}
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == in_nav, f"pages not in mkdocs.yml's nav: {sorted(on_disk - in_nav)}; " \
                              f"in the nav but missing: {sorted(in_nav - on_disk)}"
    api = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    packages = sorted(p.parent.name for p in (ROOT / "src/lmforge").glob("*/__init__.py"))
    modules = sorted(p.stem for p in (ROOT / "src/lmforge").glob("*.py") if not p.stem.startswith("_"))
    missing = [name for name in packages + modules if f"::: lmforge.{name}\n" not in api]
    assert not missing, f"no API page renders lmforge.{missing} (add `::: lmforge.NAME` to a page in docs/api/)"


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_README_LINES


def named_paths(text: str) -> set[str]:
    """Repository paths the text names (``src/lmforge/corpus/``, ``tests/unit/test_x.py``, links)."""
    found = set(re.findall(r"(?<![\w./-])((?:src|tests|conf|benchmarks|pipelines|docs|\.ci)/[\w./-]*)", text))
    return {p.rstrip(".,:;") for p in found if "..." not in p}


def test_every_path_the_docs_name_exists():
    written = {f.path for f in all_files()}
    missing = []
    for path in doc_pages():
        text = path.read_text(encoding="utf-8")
        links = {m for m in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in m}
        for name in named_paths(text) - written - OUTPUT_PATHS:
            if not (ROOT / name).exists():
                missing.append(f"{relative(path)}: {name}")
        for link in links:
            if not (path.parent / link).exists():
                missing.append(f"{relative(path)}: link {link}")
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(sorted(missing))


def defined_names(module: Path) -> dict[str, set[str]]:
    """Top-level names of a module, each with the names defined in its body (for classes)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} | \
                    {t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            names[node.name] = inner
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update({t.id: set() for t in ast.walk(target) if isinstance(t, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
    return names


def resolves(dotted: str) -> bool:
    """Whether ``lmforge.a.b.c`` is a module of src/, or a name (or a class's member) defined in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT / "src" / Path(*parts[:cut])
        module = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names = defined_names(module)
        return len(rest) <= 2 and rest[0] in names and (len(rest) == 1 or rest[1] in names[rest[0]])
    return False


def test_every_module_the_docs_name_exists():
    wrong = []
    for path in doc_pages():
        for span in re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")):
            for dotted in re.findall(r"(?<![\w.])lmforge(?:\.\w+)+", span):
                if dotted not in KEYS_NOT_MODULES and not resolves(dotted):
                    wrong.append(f"{relative(path)}: {dotted}")
    assert not wrong, "the docs name modules or names that do not exist:\n" + "\n".join(sorted(set(wrong)))


def test_the_name_check_catches_a_moved_module():
    assert resolves("lmforge.tokenization.tokenizer.Encoder")
    assert resolves("lmforge.tracking.runs.TrainingRun")
    assert not resolves("lmforge.tokenizer.Encoder")  # the flat module of the old layout
    assert not resolves("lmforge.corpus.prepared")
    assert named_paths("see `src/lmforge/model.py`, and src/lmforge/model/gpt.py.") == {
        "src/lmforge/model.py", "src/lmforge/model/gpt.py"}
