"""Paths handed to us by users, folders and files: opened only when they are regular files, and
kept inside the folder they belong to (links followed)."""
from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import AdaptkitError, CorruptFileError, printable


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` when it is a regular file (links followed), else one line saying what it is instead.

    Call it before opening any file a user or a folder hands us: opening a FIFO blocks until some
    writer appears and a device can be read forever, so neither may reach `open()`.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AdaptkitError(f"{path}: no such {what}") from None
    except ValueError:  # a NUL byte in the name
        raise AdaptkitError(f"{printable(str(path))}: not a valid file name") from None
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
        kind = next((name for test, name in kinds if test(mode)), "not a regular file")
        raise AdaptkitError(f"{path}: this {what} is {kind}, not a regular file; refused")
    return path


def inside(path: Path, folder: Path) -> Path:
    """`path`, found in `folder`, when it resolves inside it, links followed; else one line. For a Hub
    cache snapshot (`models--org--name/snapshots/<commit>`) the bound is the repo folder, since the
    snapshot's files are links to `../../blobs/`."""
    root = Path(os.path.realpath(folder))
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        raise AdaptkitError(f"{path}: links to {target}, outside {root}; refused")
    return path


def member(folder: Path, name: str, source: Path) -> Path:
    """The file `name` (as written in the file `source`, e.g. a shard of an index) in `folder`;
    refused in one line when the name is not a relative path below the folder or leads out of it."""
    parts = PurePosixPath(name).parts
    if not name or "\0" in name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or ":" in name:
        raise CorruptFileError(f"{source}: the file name '{printable(name)}' is not a plain name inside {folder}; refused")
    return inside(folder / name, folder)


__all__ = ["inside", "member", "regular_file"]
