"""Saving that a crash cannot tear: files and folders are written beside their place, flushed to disk (`fsync`) and
then renamed into place, so a reader finds the previous version or the new one, never a mix.
"""

from __future__ import annotations

import os


__all__ = ["fsync_directory", "fsync_tree"]


def fsync_directory(path: str) -> None:
    """
    Flushes the entries of directory `path` (a rename inside it, a new file) to disk. A no-op where directories cannot
    be opened (Windows).

    Args:
        path (`str`):
            The directory.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse to sync a directory; their renames are durable anyway
        pass
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """
    Flushes every file under `path` (or the file `path`) and every directory's entries to disk, e.g. a dataset written
    by `save_to_disk` before it is renamed into place.

    Args:
        path (`str`):
            A file or a directory.
    """
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_directory(folder)
