"""Saving that a crash cannot tear: files and folders are written beside their place, flushed to disk (`fsync`) and
then renamed into place, so a reader finds the previous version or the new one, never a mix.
"""

from __future__ import annotations

import os


__all__ = ["PENDING_DIR", "STAGING_DIR", "fsync_directory", "fsync_tree", "recover_save", "replace_files"]


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


# A save in two steps: the new files are written to `STAGING_DIR` (a crash here leaves the previous files in place and
# the staging folder, which the next save or load removes), which is then renamed to `PENDING_DIR` (the commit point),
# and its files moved into place one by one (a crash here is finished by the next save or load: the pending folder
# holds the whole new set).
STAGING_DIR = ".s2t-staging"
PENDING_DIR = ".s2t-pending"


def _move_into(source: str, target: str) -> None:
    """Moves every file under `source` to the same relative path under `target` (renames, one by one)."""
    for folder, _, names in os.walk(source):
        destination = os.path.join(target, os.path.relpath(folder, source))
        os.makedirs(destination, exist_ok=True)
        for name in sorted(names):
            os.replace(os.path.join(folder, name), os.path.join(destination, name))
        fsync_directory(destination)


def recover_save(directory: str) -> bool:
    """
    Finishes or drops a save into `directory` that a crash interrupted ([`replace_files`]): a committed one is moved
    into place, an uncommitted one is removed. Returns whether a committed save was finished.

    Args:
        directory (`str`):
            The folder saved into.

    Returns:
        `bool`: `True` when a committed save was finished.
    """
    import shutil

    finished = False
    pending = os.path.join(directory, PENDING_DIR)
    if os.path.isdir(pending):
        _move_into(pending, directory)
        shutil.rmtree(pending)
        finished = True
    staging = os.path.join(directory, STAGING_DIR)
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    if finished:
        fsync_directory(directory)
    return finished


def replace_files(directory: str, write) -> None:
    """
    Writes a set of files into `directory` so that a crash leaves either the previous set or the new one, never a
    mix; other files of `directory` stay untouched. `write(folder)` writes the new set into an empty `folder` beside
    their place; the files are flushed to disk, the set committed by one rename, then moved into place. An
    interrupted save is finished or dropped by [`recover_save`] (called here first, and by the loader).

    Args:
        directory (`str`):
            The folder to save into (created if needed).
        write (`Callable[[str], None]`):
            Writes the new files into the folder it is given.
    """
    import shutil

    os.makedirs(directory, exist_ok=True)
    recover_save(directory)
    staging = os.path.join(directory, STAGING_DIR)
    os.makedirs(staging)
    try:
        write(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, os.path.join(directory, PENDING_DIR))  # the commit point
    fsync_directory(directory)
    recover_save(directory)
