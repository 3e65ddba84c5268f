"""What lmforge writes: files, so that nothing half-written is ever left behind, and progress for a person.

Every stage writes to a temporary sibling and renames it into place only once it is complete;
a failure removes the temporary copy and leaves any previous output untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on error delete it.

    With ``directory=True`` the temporary path is an (empty) directory to fill; an existing
    directory at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        _honour_umask(tmp)
        if directory:
            _replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _honour_umask(root: Path) -> None:
    """Widen what a writer made private inside an output (safetensors writes 0600) to what the
    umask allows, as for any file the user creates; never grant more, never take bits away."""
    mask = _umask()
    inside = [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files] if root.is_dir() else []
    for entry in [root, *inside]:
        if entry.is_symlink():
            continue
        mode = entry.stat().st_mode & 0o777
        wanted = (0o777 if entry.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode != wanted and mode & ~wanted == 0:
            os.chmod(entry, wanted)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_directory(new: Path, target: Path) -> None:
    # Two renames rather than one: rename() cannot replace a non-empty directory.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- progress: a bar when someone watches a terminal, plain lines elsewhere ---------------------


def watched() -> bool:
    """True when stderr is a terminal and ``CI`` is unset: progress bars then, plain lines otherwise."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m07s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(total: int | None, desc: str, unit: str = "B"):
    """A tqdm bar with rate and ETA on stderr; silent when stderr is not a terminal or ``CI`` is set."""
    from tqdm import tqdm  # lazily: a 0.1 s import that only stages with a bar pay

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not watched(), dynamic_ncols=True,
                smoothing=0.05, mininterval=0.5)
