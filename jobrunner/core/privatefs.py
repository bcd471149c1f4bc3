"""Files private to the user who runs jobrunner: 0600 files in 0700 directories.

Local mode keeps message bodies, Secrets and queues on disk (the local executor's Job
directories, the embedded queue's SQLite file); on a shared machine they must not be
readable by other users. The mode is set, not asked of the umask: ``os.open`` and
``os.mkdir`` only ever take bits away from the mode given (so an umask of 022 would
still give 0600/0700, but one of 0277 would leave the owner unable to write), and files
made by older versions, which did not ask, are tightened at start (``tighten``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """``mkdir -p`` whose new directories are 0700 (those that exist are left alone)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: its maker set its mode
        os.chmod(directory, DIR_MODE)


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """``os.open`` with ``O_CREAT``, the file 0600 (also when it existed: made by an
    older version, or under another umask). Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    with contextlib.suppress(PermissionError):  # not ours: leave it as it is
        os.fchmod(fd, FILE_MODE)
    return fd


def append_private(path: Path) -> BinaryIO:
    """A private file opened for appending in binary (a log)."""
    return os.fdopen(open_private(path), "ab")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a private file, replacing what it held."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb") as out:
        out.write(data)


def replace_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a private temporary file, renamed over it):
    readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, data)
    os.replace(tmp, path)


def _walk(root: Path, skip: Callable[[Path], bool]) -> Iterator[tuple[Path, os.stat_result]]:
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            continue  # never follow a link out of the tree
        yield path, info
        if stat.S_ISDIR(info.st_mode) and not skip(path):
            yield from _walk(path, skip)


def tighten(root: Path, *, skip: Callable[[Path], bool] = lambda path: False) -> int:
    """Take the group's and others' bits off ``root`` and everything under it that this
    user owns (0644 becomes 0600, 0755 becomes 0700; the owner's own bits are kept).
    What is under a directory ``skip`` names is not entered. Returns how many modes
    changed."""
    changed = 0
    uid = os.geteuid()
    try:
        top = root.lstat()
    except FileNotFoundError:
        return 0
    for path, info in [(root, top), *_walk(root, skip)]:
        if info.st_uid != uid or not info.st_mode & 0o077:
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)  # links were skipped
            changed += 1
    return changed
