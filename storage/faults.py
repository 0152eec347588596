"""Fault-injection hook for ``tools/fault_inject.py``; inert unless its variables are set.

The storage layer calls :func:`point` at every durable-write step: after each zarr chunk
or Gram array, and after a file or store has been written aside but before it is renamed
into place. Two environment variables drive it (looked up at each call, a dictionary
lookup, so a process forked from a warm interpreter can set them):

``COSPADI_FAULT_KILL_AT=n``
    the process SIGKILLs itself at the n-th point (counted per process), leaving whatever
    was half-written exactly as a crash would.
``COSPADI_FAULT_TRACE=path``
    one line per point is appended to ``path``: ``n<TAB>unix time<TAB>label``.

With neither set, :func:`point` does nothing. Not for production use.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_guard = threading.Lock()
_count = 0


def point(label: str) -> None:
    """A durable-write step named ``label`` (a path, possibly with a detail)."""
    kill_at = os.environ.get("COSPADI_FAULT_KILL_AT")
    trace = os.environ.get("COSPADI_FAULT_TRACE")
    if not (kill_at or trace):
        return
    global _count
    with _guard:
        _count += 1
        if trace:
            fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{_count}\t{time.time():.6f}\t{label}\n".encode())
            finally:
                os.close(fd)
        if kill_at and _count == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
