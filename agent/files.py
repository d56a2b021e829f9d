"""Small files of the data directory, replaced whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

FileStamp = tuple[int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """What tells a reader that a file replaced whole (:func:`replace_file`) changed since it
    last read it: inode, mtime and size. The inode is what tells apart two versions of one
    size written within one tick of the filesystem's clock (they share mtime and size)."""
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def replace_file(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file (0644 less the umask, or exactly ``mode`` when
    given), fsync it, rename it over
    ``path`` and fsync the directory. On :class:`OSError` ``path`` is untouched and the
    temporary file is gone; callers turn the error into their party's."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
