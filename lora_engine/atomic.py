"""Write a file so that a crash never leaves a half-written file under the final name.

The bytes go to a temporary file in the same directory (same filesystem, so the rename is atomic),
are fsync'ed, and only then replace the target with os.replace; the directory is fsync'ed last so
the rename itself survives a power loss. A failed write removes the temporary file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_open(p) as f: f.write(...)`: `p` appears, complete, only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_save(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Atomic version of a writer that takes a file object, e.g. `atomic_save(p, lambda f: torch.save(obj, f))`."""
    with atomic_open(path) as f:
        write(f)


def _file_mode(path: Path) -> int:
    """The target's current permissions, or what a plain open() would give a new file."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
