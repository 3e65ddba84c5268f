"""What lmforge writes: files, so that nothing half-written is ever left behind, and progress for a person.

Every stage first checks that it can write each of its outputs (``check_writable``), then writes each
to a temporary sibling and renames it into place only once it is complete; a failure removes the
temporary copy and leaves any previous output untouched, and a write the system refuses (permission,
read-only or full disk) ends in one sentence naming the path, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

# Errors that only a write can meet: whatever file they name, they are the output's.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def check_writable(*outputs: tuple[str, str | os.PathLike]) -> None:
    """Check, before a stage does any work, that it can write each of its ``outputs``.

    Each output is a pair: the config key that places it (``paths.reports``) and the output itself
    (``reports/prepare.json``). An output is written by creating a temporary sibling and renaming it
    (``atomic_path``), so what must be writable is the folder it goes in or, where that does not exist
    yet, the nearest folder above it that does (a probe file is created there and removed at once).
    Raises LmforgeError naming the output, the folder, the key and the fix for the first output
    that cannot be written.
    """
    for key, output in outputs:
        target = Path(output)
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            problem = f"{folder} is a file, not a folder"
        else:
            try:
                fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", dir=folder)
                os.close(fd)
                os.unlink(probe)
                continue
            except OSError as err:
                problem = f"{folder} is not writable ({err.strerror or err})"
        raise LmforgeError(f"cannot write {target}: {problem}; make {folder} a folder you can write, or set {key} "
                           "to one, and rerun (nothing was written).")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on error delete it.

    With ``directory=True`` the temporary path is an (empty) directory to fill; an existing
    directory at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions.
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield tmp
        _honour_umask(tmp)
        if directory:
            _replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as err:
        refused = _write_error(path, err, tmp) if _is_write_error(err, path, tmp) else None
        _remove(tmp)
        if refused is not None:
            raise refused from None
        raise
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


def _is_write_error(err: OSError, path: Path, tmp: Path) -> bool:
    """Whether ``err`` is the writing of ``path`` failing (not, say, the reading of an input)."""
    if err.errno in _WRITE_ERRNOS:
        return True
    for name in (err.filename, err.filename2):
        if name is None:
            continue
        name = Path(os.fsdecode(name))
        if name == path or name == tmp or tmp in name.parents or (
                name.parent == path.parent and name.name.startswith(f".{path.name}.")):
            return True
    return False


def _write_error(path: Path, err: OSError, tmp: Path | None = None) -> LmforgeError:
    """One sentence for a write the system refused: the path, why, and what to do. A place inside the
    temporary ``tmp`` (about to be removed) is named as the place it would have had in ``path``."""
    where = Path(os.fsdecode(err.filename)) if err.filename is not None else path
    in_the_way = next((p for p in [where, *where.parents] if p.exists() and not p.is_dir()), None)

    def shown(place: Path) -> Path:
        return path / place.relative_to(tmp) if tmp is not None and (place == tmp or tmp in place.parents) else place

    if err.errno in (errno.ENOTDIR, errno.EEXIST) and in_the_way is not None:
        problem = f"{shown(in_the_way)} is a file, not a folder"
    else:
        problem = f"{err.strerror or type(err).__name__} ({shown(where)})"
    return LmforgeError(f"cannot write {path}: {problem}; make {path.parent} a folder you can write, with space "
                        "free, and rerun (nothing was replaced).")


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
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)  # the previous output back where it was
        raise
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
