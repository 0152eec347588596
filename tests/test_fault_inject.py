"""Crash safety, fast: a few SIGKILLs through tools/fault_inject.py, and the work-dir lock.

The full campaign (20+ kills) is ``python tools/fault_inject.py``; here one chain of three
kills (at a write step or a random time, the second and third in a resumed run) must end
in a run that completes with the bytes of an uninterrupted one and no task redone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cospadi.pipeline.cli import main

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fault_inject.py"


def _tool():
    spec = importlib.util.spec_from_file_location("fault_inject", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_inject"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tool = _tool()
    root = tmp_path_factory.mktemp("faults")
    runner = tool.Campaign(root, kills=3, seed=1, chain=3, method="cospadi",
                           log=lambda *a: None)
    runner.server = tool.ForkServer()
    try:
        yield tool, runner, runner.execute()
    finally:
        runner.server.close()


def test_kills_resume_to_identical_files(campaign):
    tool, _, report = campaign
    data = report.as_json()
    assert report.ok, tool.summary(report)
    assert data["kills"] == 3
    assert data["resumes_failed"] == 0 and not data["failures"]
    assert data["resumes_completed"] + data["resumes_killed_again"] == data["resumes"] >= 3
    assert data["files_corrupt"] == 0 and data["files_identical"] == data["files_compared"]
    assert data["files_compared"] >= data["files_per_run"] >= 10
    assert data["tasks_recomputed"] == 0 and data["tasks_done"] >= 7
    assert not data["stray_files"] and not data["torn_after_kill"]
    assert set(data["kills_by_mode"]) == {"write", "time"}


def _holder(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def test_second_run_refused_then_stale_lock_taken_over(campaign, capsys):
    """While a run holds the work dir (stopped mid-run) a second one refuses at once;
    once the first is SIGKILLed its lock is stale and the second resumes and completes."""
    tool, runner, _ = campaign
    folder = runner.root / "lock"
    folder.mkdir()
    cli = runner.argv(folder)
    first = runner.server.launch(cli, dict(os.environ), folder, folder / "stderr.txt")
    lock = folder / "work" / "lock"
    ended = None
    try:
        deadline = time.monotonic() + 120
        while _holder(lock) != first:
            ended = runner.server.poll(0.01)
            assert ended is None, "the first run ended before taking the lock"
            assert time.monotonic() < deadline
        os.kill(first, signal.SIGSTOP)  # holds the lock, makes no progress
        start = time.monotonic()
        assert main(cli) == 2
        refused_in = time.monotonic() - start
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "is in use by another cospadi run" in line and f"pid {first}" in line
        assert refused_in < 5, refused_in  # before the model and text checks
    finally:
        if ended is None:  # not reaped yet: the pid is still the first run's
            os.kill(first, signal.SIGKILL)
            assert runner.server.poll(None) == -signal.SIGKILL
    assert _holder(lock) == first  # stale: the dead run's record, no flock
    assert main(cli[1:]) == 0  # not quiet: the take-over is logged
    assert f"run {first} on " in capsys.readouterr().err
    assert tool.output_files(folder) == tool.output_files(runner.root / "reference")
