"""Durable writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a resumed job) therefore sees either the old file or the complete new one,
never a torn write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from . import faults


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success fsync it and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp
        faults.point(str(target))  # written aside, not yet in place
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        better = named(err, target)
        if better is None:
            raise
        raise better from err


def named(err: BaseException, target: Path) -> OSError | None:
    """For an ``OSError`` without a file name (a failed write: EFBIG, ENOSPC), the same
    error naming ``target``, so the user learns what could not be written; else None."""
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        return OSError(err.errno, err.strerror, str(target))
    return None


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: object) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` fill a temp path (e.g. ``safetensors.torch.save_file``), then commit.

    A writer's I/O failure reported as a foreign exception (safetensors' Rust errors end
    in ``(os error 27)``) is raised as the ``OSError`` it is, naming ``target``, so that
    a full disk reads as one.
    """
    with atomic_path(target) as tmp:
        try:
            writer(tmp)
        except OSError:
            raise
        except Exception as err:
            match = _OS_ERROR.search(str(err))
            if match is None:
                raise
            code = int(match.group(1))
            raise OSError(code, os.strerror(code), str(target)) from err
