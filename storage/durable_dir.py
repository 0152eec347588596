"""Durable directory writes: fill a hidden temp folder, fsync every file, rename into place.

Zarr stores are folders of many chunk files; a resumed job must see a store either
complete or not at all, so a store is written aside and renamed only when whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from . import faults
from .atomic import fsync_dir, named


def temp_dir_for(target: Path) -> Path:
    # deterministic name: a retry after a crash finds and discards the torn attempt
    return target.parent / f".{target.name}.partial"


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder; on success make it durable and rename it to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(target)
    remove_tree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        faults.point(str(target))  # written aside, not yet in place
        fsync_tree(tmp)
        remove_tree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as err:
        remove_tree(tmp)
        better = named(err, target)
        if better is None:
            raise
        raise better from err


def remove_tree(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left under ``root``: ``.*.tmp`` files of atomic writes
    (random names, so a retry never reuses them) and ``.*.partial`` folders. Call only
    while no writer can be active (the work-dir lock held, no task running)."""
    stale = [path for path in Path(root).rglob(".*")
             if path.name.endswith((".tmp", ".partial"))]
    for path in stale:
        remove_tree(path)
    return stale
