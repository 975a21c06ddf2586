"""Files on the disk for good: rewritten whole or not at all (an answer file's final sort, a checkpoint's
progress.json), and a folder's files synced before something marks them complete."""

from __future__ import annotations

import errno
import os
from pathlib import Path

POSIX = os.name == "posix"  # (else Windows: a folder cannot be opened, and a file is synced open for writing)
# What fsync of a folder answers on a filesystem that has no such sync (SMB/CIFS shares, WSL's drvfs, some network
# and FUSE ones): nothing more can be waited for there, and a checkpoint must not fail over it
NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def write_atomically(path: str | Path, text: str, temporary_suffix: str = ".partial") -> None:
    """Replace `path` by `text` (UTF-8): written beside it, synced to the disk, then renamed over it, so that an
    interruption (Ctrl-C, a kill, a crash of the machine) leaves the old file or the new one, never a part.
    A failed write removes its half-written copy."""
    path = Path(path)
    temporary = path.with_name(path.name + temporary_suffix)
    try:
        with temporary.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # else a crash after the rename may leave the new name on data never written
        os.replace(temporary, path)
    except BaseException:  # (Ctrl-C too)
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)  # the rename itself is on the disk once its folder is


def sync_files(folder: Path) -> None:
    """Sync every file in `folder` (and its folders) to the disk, then the folder: what a crash of the machine
    must not lose once something (progress.json) says they are written."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb" if POSIX else "r+b") as f:  # (Windows' fsync refuses a file open for reading only)
                os.fsync(f.fileno())
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """Sync `folder`'s entries (a rename, a new file) to the disk, where the system and the filesystem can."""
    if not POSIX:  # (Windows cannot open a folder; its renames need no such sync)
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in NO_FOLDER_SYNC:  # (an I/O error is still raised)
            raise
    finally:
        os.close(descriptor)
