"""Work-directory bookkeeping: fingerprint, per-task done records, and the run lock.

``manifest.json`` holds a fingerprint of the model files, the calibration text and the
settings that shape the outputs. A task is recorded done (``done/<task>.json``, atomic)
only after its outputs are durable, so a killed run resumes with exactly the tasks whose
records exist. Records are written by the task itself, which makes them correct whatever
process (or dask worker) ran it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage.atomic import write_json
from ..storage.durable_dir import remove_tree

MANIFEST = "manifest.json"
LOCK = "lock"
SAMPLE = 1 << 20  # bytes hashed from each end of a shard (full hashes of 140 GB take long)


class ResumeRefused(ValueError):
    """The work directory belongs to a different model, calibration or settings."""


class LockHeld(RuntimeError):
    """Another live process holds the work directory."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample_digest(path: Path) -> str:
    """Size, safetensors header and both ends of a (possibly huge) weight file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        head = handle.read(8)
        digest.update(head)
        if len(head) == 8:
            header_len = min(int.from_bytes(head, "little"), 100 << 20)
            digest.update(handle.read(header_len))
        handle.seek(max(0, size - SAMPLE))
        digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = _sample_digest(path)
        elif path.name in ("config.json", "model.safetensors.index.json"):
            out[path.name] = _sha256_file(path)
    return out


def fingerprint(model_dir: Path, calibration: dict[str, str] | None,
                settings: dict[str, Any]) -> dict:
    """``calibration``: the calibration set's digest (its source's content and the token
    windows made from it, see stages/calib_data.py)."""
    return {
        "model": model_fingerprint(model_dir),
        "calibration": calibration,
        "settings": settings,
    }


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable list of what differs between two fingerprints."""
    out = []
    old_model, new_model = old.get("model", {}), new.get("model", {})
    changed = sorted(k for k in set(old_model) | set(new_model)
                     if old_model.get(k) != new_model.get(k))
    if changed:
        out.append(f"model files differ ({', '.join(changed[:3])}"
                   f"{', ...' if len(changed) > 3 else ''})")
    # manifests written before calibration digests held the text file's hash as a string
    old_cal, new_cal = (c if isinstance(c, dict) else {"content": c}
                        for c in (old.get("calibration"), new.get("calibration")))
    if old_cal != new_cal:
        kind = "text" if new_cal.get("kind") == "text" else "data"
        if "tokens" not in old_cal:
            what = " (work dir written by an older cospadi: its token windows are unknown)"
        elif old_cal.get("content") != new_cal.get("content"):
            what = ""
        else:
            what = (" (same content, other token windows: --bos, --calib-packing or the "
                    "tokenizer changed)")
        out.append(f"calibration {kind} differs{what}")
    old_set, new_set = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_set) | set(new_set)):
        if old_set.get(key) != new_set.get(key):
            out.append(f"{key.replace('_', '-')} {old_set.get(key)!r} -> {new_set.get(key)!r}")
    return out


@dataclass(frozen=True)
class WorkDir:
    """Paths inside a work directory (pure: nothing is created here)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def done_dir(self) -> Path:
        return self.root / "done"

    def done_record(self, task: str) -> Path:
        return self.done_dir / f"{task}.json"

    def activations(self, layer: int) -> Path:
        return self.root / "activations" / f"block_{layer:04d}.zarr"

    def grams(self, layer: int) -> Path:
        return self.root / "grams" / f"block_{layer:04d}.zarr"

    def factors(self, layer: int) -> Path:
        return self.root / "factors" / f"block_{layer:04d}.safetensors"


def is_done(work: WorkDir, task: str) -> bool:
    return work.done_record(task).is_file()


def mark_done(work: WorkDir, task: str, info: dict[str, Any] | None = None) -> None:
    """Record ``task`` as done; call only once its outputs are durable.

    The record also keeps the process's peak RSS so far (diagnostics: which stage of a
    run set its memory peak)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    write_json(work.done_record(task), {"task": task, "peak_rss_so_far": peak, **(info or {})})


def done_tasks(work: WorkDir) -> set[str]:
    if not work.done_dir.is_dir():
        return set()
    return {p.name[:-5] for p in work.done_dir.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".")}


def open_manifest(work: WorkDir, current: dict, restart: bool) -> bool:
    """Create or check the manifest; returns True when resuming earlier work.

    A mismatch refuses (naming what differs) unless ``restart``, which wipes the directory
    (the lock file excepted).
    """
    work.root.mkdir(parents=True, exist_ok=True)
    if work.manifest.is_file() and not restart:
        try:
            old = json.loads(work.manifest.read_text())["fingerprint"]
        except (ValueError, KeyError) as err:
            raise ResumeRefused(f"work dir {work.root} has an unreadable {MANIFEST}; pass "
                                "--restart to discard it") from err
        diff = differences(old, current)
        if diff:
            raise ResumeRefused(f"work dir {work.root} holds a run with a different setup: "
                                f"{'; '.join(diff)}. Pass --restart to discard it")
        return bool(done_tasks(work))
    work.manifest.unlink(missing_ok=True)  # first: a wipe killed halfway is not resumable
    for entry in work.root.iterdir():
        if entry.name != LOCK:
            remove_tree(entry)
    write_json(work.manifest, {"format": "cospadi-work", "version": 1, "fingerprint": current})
    return False


# --- lock -------------------------------------------------------------------------------

class WorkLock:
    """Exclusive lock on a work directory (``flock``), naming its holder when refused.

    The kernel drops an flock when its process dies, so a lock left by a killed run is
    taken over without any guessing; the PID written in the file is for the message only.
    The file is never unlinked: unlinking would let two runs lock different inodes.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.previous: dict = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(f"work dir {self.path.parent} is in use by another cospadi run "
                           f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}); "
                           "wait for it to finish or stop it") from None
        previous = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self.previous = previous  # a dead run's record, for the log

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
