"""Crash safety: SIGKILL ``cospadi compress`` at random moments, resume, compare the bytes.

Compresses a tiny random Llama (3 blocks in groups of 2, a 10-shard checkpoint, CoSpaDi)
once without interruption, then again while killing the process with SIGKILL at
``--kills`` random moments (seeded). After each kill the same command is run again in the
same folders; a run that completes ends an episode, whose output files (the model folder
and the factor files kept in the work dir) are compared byte for byte with the
uninterrupted run, and the next kill starts a fresh episode. With ``--chain C`` a resume
may itself be killed, up to C kills per episode.

Two kinds of moment, half of the kills each, in a seeded shuffle:

* ``write``: the process kills itself at its k-th durable-write step (the hook in
  ``storage/faults.py``, driven by ``COSPADI_FAULT_KILL_AT``): after a zarr chunk or a
  Gram array with its store half written, or with a zarr store, factor file, output shard
  or file, done record or manifest written aside but not yet renamed into place. The
  kills cycle through these kinds in a seeded order, each at a uniformly drawn step of
  that kind, so every kind is hit.
* ``time``: the tool sends SIGKILL a random delay after the process took the work-dir
  lock, uniform over the time an uninterrupted run spends on the work still to do,
  wherever the process is: mid-compute, inside a safetensors or zarr write, between two
  renames, tidying up after the last task.

Every run is traced (``COSPADI_FAULT_TRACE``), so each kill is placed in a stage (the
task it interrupted; for a time kill, the task of the next write step in the reference
order, an estimate) and a moment. After every kill, whatever looks finished (the output
folder if present, the factor files of tasks recorded done) must equal the reference.
"Work redone" counts tasks already recorded done (``work/done/<task>.json``) that ran
again: a task that runs rewrites its record, so the records are snapshotted (bytes and
mtime) before each run and compared after it.

Runs are forks of a warm interpreter that has imported cospadi, torch and transformers
once (each child runs the CLI's ``main`` in a process of its own, which is what gets
killed); ``--fresh`` starts a new interpreter per run instead, the ``cospadi`` command
exactly, at several seconds of imports a run.

    python tools/fault_inject.py [--kills 20] [--seed 0] [--chain 1] [--fresh] [--json]
                                 [--method cospadi] [--propagate original] [--keep DIR]

Targets (issue 5): every resume completes, every file identical, nothing recomputed.
Exit status 0 when they are met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the compress settings of every run: tiny, single-threaded, every stage present
SETTINGS = ["--calib-samples", "6", "--seq-len", "24", "--micro-batch", "4", "--iters", "3",
            "--group-size", "2", "--torch-threads", "1", "--device", "cpu"]


@dataclass
class Event:
    number: int
    seconds: float  # since the process was started
    label: str  # relative to the episode folder


@dataclass
class Run:
    rc: int
    seconds: float
    events: list[Event]
    stderr: str
    pid: int
    locked: float | None  # seconds from start to taking the work-dir lock (as polled)


@dataclass
class Kill:
    mode: str  # write | time
    at: float  # write step number, or seconds after the run took the lock
    stage: str  # the task interrupted (or "startup")
    moment: str  # what was being written, or "between writes"
    resumed: bool  # the killed run was itself a resume


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    resumes: int = 0
    resumes_completed: int = 0
    resumes_killed_again: int = 0
    resumes_failed: int = 0
    failures: list[str] = field(default_factory=list)
    episodes: int = 0
    files_compared: int = 0
    files_per_run: int = 0
    files_identical: int = 0
    files_corrupt: list[str] = field(default_factory=list)  # differ, missing or extra
    stray_files: list[str] = field(default_factory=list)  # temp files left after completion
    torn_after_kill: list[str] = field(default_factory=list)  # finished-looking but wrong
    tasks_done: int = 0  # task completions recorded over all runs
    tasks_recomputed: list[str] = field(default_factory=list)  # finished, then run again
    reference_seconds: float = 0.0
    reference_steps: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "kills": len(self.kills),
            "kills_by_mode": dict(Counter(k.mode for k in self.kills)),
            "kills_by_stage": dict(Counter(k.stage.split("-")[0] for k in self.kills)),
            "kills_by_moment": dict(Counter(k.moment for k in self.kills)),
            "kills_in_a_resume": sum(k.resumed for k in self.kills),
            "resumes": self.resumes,
            "resumes_completed": self.resumes_completed,
            "resumes_killed_again": self.resumes_killed_again,
            "resumes_failed": self.resumes_failed,
            "failures": self.failures,
            "episodes": self.episodes,
            "files_compared": self.files_compared,
            "files_per_run": self.files_per_run,
            "files_identical": self.files_identical,
            "files_corrupt": len(self.files_corrupt),
            "corrupt": self.files_corrupt,
            "stray_files": self.stray_files,
            "torn_after_kill": self.torn_after_kill,
            "tasks_done": self.tasks_done,
            "tasks_recomputed": len(self.tasks_recomputed),
            "recomputed": self.tasks_recomputed,
            "reference_seconds": round(self.reference_seconds, 2),
            "reference_write_steps": self.reference_steps,
            "seconds": round(self.seconds, 1),
            "kill_log": [vars(k) for k in self.kills],
        }

    @property
    def ok(self) -> bool:
        return (self.resumes_failed == 0 and not self.failures and not self.files_corrupt
                and not self.stray_files
                and not self.torn_after_kill and not self.tasks_recomputed
                and self.resumes_completed + self.resumes_killed_again == self.resumes)


# --- one run ------------------------------------------------------------------------------

def make_assets(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import calib_text, make_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return make_model(root / "model", "llama", layers=3), calib_text(root / "calib.txt")


def command(model: Path, text: Path, folder: Path, method: str,
            propagate: str = "original") -> list[str]:
    return [sys.executable, "-m", "cospadi.pipeline.cli",
            *cli_args(model, text, folder, method, propagate)]


def cli_args(model: Path, text: Path, folder: Path, method: str,
             propagate: str = "original") -> list[str]:
    return ["-q", "compress", "--model", str(model), "--out", str(folder / "out"),
            "--work-dir", str(folder / "work"), "--calib-text", str(text), "--method", method,
            "--propagate", propagate, *SETTINGS]


# A warm interpreter that has imported cospadi, torch and transformers once and forks one
# child per run: the child runs the CLI's main() exactly as ``cospadi`` does, in a process
# of its own that we SIGKILL, minus the seconds of imports (most of a tiny run).
FORK_SERVER = r"""
import json, os, sys, traceback
import cospadi.pipeline.cli as cli
import cospadi.pipeline.compress, cospadi.stages.assemble, cospadi.stages.factorize
import cospadi.storage.factor_files
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(null, 0), os.dup2(null, 1), os.dup2(err, 2)
            code = cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.buffer = b""
        self._line(None)  # imports done

    def _line(self, timeout: float | None) -> dict | None:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def launch(self, argv: list[str], env: dict, cwd: Path, stderr: Path) -> int:
        job = {"argv": argv, "env": env, "cwd": str(cwd), "stderr": str(stderr)}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        return self._line(None)["pid"]

    def poll(self, timeout: float | None) -> int | None:
        reply = self._line(timeout)
        return None if reply is None else reply["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _lock_holder(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def run(argv: list[str], folder: Path, trace: Path, kill_at_step: int | None = None,
        kill_after_lock: float | None = None, server: ForkServer | None = None) -> Run:
    """One ``cospadi compress`` (``argv`` without the interpreter when ``server`` forks
    it); killed at its n-th write step (by the hook) or this many seconds after it took
    the work-dir lock (by us), if asked."""
    env = dict(os.environ, COSPADI_FAULT_TRACE=str(trace), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env.pop("COSPADI_FAULT_KILL_AT", None)
    if kill_at_step is not None:
        env["COSPADI_FAULT_KILL_AT"] = str(kill_at_step)
    trace.unlink(missing_ok=True)
    lock = folder / "work" / "lock"
    err = trace.with_suffix(".stderr")
    locked, rc = None, None
    start = time.time()
    if server is not None:
        pid = server.launch(argv, env, folder, err)
        poll = server.poll
    else:
        with open(err, "w") as handle:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=handle,
                                    cwd=folder)
        pid = proc.pid

        def poll(timeout: float | None) -> int | None:
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
    while rc is None:
        now = time.time() - start
        if locked is None and _lock_holder(lock) == pid:
            locked = now
        if kill_after_lock is not None and locked is not None and \
                now >= locked + kill_after_lock:
            os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still ours
            rc = poll(None)
            break
        rc = poll(0.005)
    seconds = time.time() - start
    stderr = err.read_text()
    events = []
    if trace.exists():
        prefix = str(folder) + os.sep
        for line in trace.read_text().splitlines():
            number, stamp, label = line.split("\t", 2)
            events.append(Event(int(number), float(stamp) - start, label.replace(prefix, "")))
    return Run(rc, seconds, events, stderr, pid, locked)


# --- the reference run and where its write steps belong -----------------------------------

@dataclass
class Reference:
    events: list[Event]
    owner: dict[str, str]  # event label -> task that writes it ("setup" for the manifest)
    order: list[str]  # tasks in the order they completed
    files: dict[str, bytes]
    seconds: float
    span: float  # seconds from taking the lock to exit


_DONE = re.compile(r"(?:^|/)done/([^/]+)\.json$")


def reference(argv: list[str], folder: Path, trace: Path,
              server: ForkServer | None = None) -> Reference:
    result = run(argv, folder, trace, server=server)
    if result.rc != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{result.stderr[-3000:]}")
    owner, order, waiting = {}, [], []
    for event in result.events:
        if event.label.endswith("manifest.json"):
            owner[event.label] = "setup"
            continue
        waiting.append(event.label)
        done = _DONE.search(event.label)
        if done:
            order.append(done.group(1))
            owner.update((label, done.group(1)) for label in waiting)
            waiting = []
    assert not waiting, f"write steps after the last done record: {waiting}"
    locked = result.locked if result.locked is not None else result.events[0].seconds
    return Reference(result.events, owner, order, output_files(folder), result.seconds,
                     result.seconds - locked)


def output_files(folder: Path) -> dict[str, bytes]:
    """The compressed model and the factor files kept in the work dir."""
    files = {}
    for sub in ("out", "work/factors"):
        for path in sorted((folder / sub).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def done_records(folder: Path) -> dict[str, tuple[int, bytes]]:
    done = folder / "work" / "done"
    if not done.is_dir():
        return {}
    return {p.name[:-5]: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".")}


def moment_of(label: str) -> str:
    if " chunk " in label:
        return "zarr chunk written, store half done"
    if " array " in label:
        return "Gram array written, store half done"
    if label.endswith(".zarr"):
        return "zarr store written aside, not renamed"
    if "/done/" in label or label.startswith("done/"):
        return "done record written aside, not renamed"
    if label.endswith("manifest.json"):
        return "manifest written aside, not renamed"
    if "factors/" in label:
        return "factor file written aside, not renamed"
    if label.endswith(".safetensors"):
        return "output shard written aside, not renamed"
    return "output file written aside, not renamed"


class Campaign:
    def __init__(self, root: Path, kills: int, seed: int, chain: int, method: str,
                 log=print, fresh: bool = False, propagate: str = "original"):
        self.root, self.kills, self.chain, self.log = root, kills, chain, log
        self.fresh = fresh
        self.server: ForkServer | None = None
        self.rng = random.Random(seed)
        self.method, self.propagate = method, propagate
        self.model, self.text = make_assets(root)
        self.report = Report()
        self.runs = 0

    def folder(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def pick_step(self, pending: list[Event]) -> int:
        """A step number (1-based, in the run's own count) of the next kind in the cycle
        that the run still has to make. Exact in a fresh run (same graph, same order as
        the reference); in a resumed run dask may order independent tasks differently, so
        the step can land on another kind (the kill is still reported where it landed)."""
        available = {moment_of(e.label) for e in pending}
        for offset in range(len(self.kinds)):
            kind = self.kinds[(self.next_kind + offset) % len(self.kinds)]
            if kind in available:
                self.next_kind = (self.next_kind + offset + 1) % len(self.kinds)
                steps = [i for i, e in enumerate(pending, 1) if moment_of(e.label) == kind]
                return self.rng.choice(steps)
        return self.rng.randint(1, len(pending))

    def argv(self, folder: Path) -> list[str]:
        if self.server is None:
            return command(self.model, self.text, folder, self.method, self.propagate)
        return cli_args(self.model, self.text, folder, self.method, self.propagate)

    def remaining(self, folder: Path) -> list[Event]:
        """Reference write steps a run in ``folder`` would still make, in order."""
        done = set(done_records(folder))
        manifest = (folder / "work" / "manifest.json").is_file()
        out = []
        for event in self.ref.events:
            task = self.ref.owner[event.label]
            if task in done or (task == "setup" and manifest):
                continue
            out.append(event)
        return out

    def locate(self, result: Run, pending: list[Event], folder: Path, mode: str
               ) -> tuple[str, str]:
        """(task interrupted, moment) of a kill."""
        if mode == "write" and result.events:  # the hook traced its step, then died
            label = result.events[-1].label
            return self.ref.owner.get(label, "?"), moment_of(label)
        if result.events:  # time kill: in the task of the step after the last one made
            labels = [e.label for e in self.ref.events]
            last = result.events[-1].label
            index = labels.index(last) + 1 if last in labels else len(labels)
            if index >= len(labels):
                return "cleanup", "after the last write (tidying up, exiting)"
            return self.ref.owner[labels[index]], "between writes"
        try:  # no write yet: had it taken the lock (it writes its pid there)?
            holder = json.loads((folder / "work" / "lock").read_text() or "{}").get("pid")
        except (OSError, ValueError):
            holder = None
        if holder == result.pid and pending:
            return self.ref.owner[pending[0].label], "before the run's first write"
        return "startup", "imports and checks"

    def check_after_kill(self, folder: Path) -> None:
        """Nothing that looks finished may be wrong: the output folder, if present, and the
        factor files of every task recorded done must equal the reference."""
        files = output_files(folder)
        done = set(done_records(folder))
        expected = [name for name in self.ref.files if name.startswith("out/")] \
            if (folder / "out").exists() else []
        expected += [name for name in self.ref.files if name.startswith("work/factors/")
                     and self.ref.owner.get(name) in done]
        for name in expected:
            if files.get(name) != self.ref.files[name]:
                self.report.torn_after_kill.append(f"run {self.runs}: {name}")

    def compare(self, folder: Path) -> None:
        files = output_files(folder)
        report = self.report
        for name in sorted(set(files) | set(self.ref.files)):
            report.files_compared += 1
            if files.get(name) == self.ref.files.get(name):
                report.files_identical += 1
            else:
                why = "missing" if name not in files else \
                    "extra" if name not in self.ref.files else "differs"
                report.files_corrupt.append(f"episode {report.episodes}: {name} {why}")
        for path in folder.rglob("*"):
            if path.name.startswith(".") and path.name.endswith((".tmp", ".partial", ".old")):
                report.stray_files.append(str(path.relative_to(folder)))

    def execute(self) -> Report:
        start = time.perf_counter()
        report = self.report
        ref_folder = self.folder("reference")
        self.ref = reference(self.argv(ref_folder), ref_folder,
                             self.root / "trace-reference.txt", self.server)
        report.reference_seconds = self.ref.seconds
        report.reference_steps = len(self.ref.events)
        report.files_per_run = len(self.ref.files)
        self.log(f"uninterrupted run: {self.ref.seconds:.1f} s, {len(self.ref.events)} write "
                 f"steps, {len(self.ref.order)} tasks, {self.ref.span:.1f} s holding the lock")
        modes = ["write", "time"] * (self.kills // 2 + 1)
        modes = modes[:self.kills]
        self.rng.shuffle(modes)
        # write kills cycle through the kinds of step (zarr chunk, factor file, shard...) in
        # a seeded order, each at a uniform step of that kind: every kind is hit
        self.kinds = sorted({moment_of(e.label) for e in self.ref.events})
        self.rng.shuffle(self.kinds)
        self.next_kind = 0

        folder = self.folder(f"episode-{report.episodes}")
        after_kill, chained = False, 0
        while True:
            self.runs += 1
            if self.runs > 4 * self.kills + 10:
                report.failures.append("gave up: too many runs without the planned kills")
                break
            planned = len(report.kills) < self.kills and (not after_kill or chained < self.chain)
            pending = self.remaining(folder)
            mode, at, kwargs = None, None, {}
            if planned and pending:
                mode = modes[len(report.kills)]
                if mode == "write":
                    at = self.pick_step(pending)
                    kwargs = {"kill_at_step": at}
                else:
                    span = self.ref.span * len(pending) / len(self.ref.events)
                    at = round(self.rng.uniform(0, span), 3)
                    kwargs = {"kill_after_lock": at}
            before = done_records(folder)
            result = run(self.argv(folder), folder, self.root / f"trace-{self.runs}.txt",
                         server=self.server, **kwargs)
            after = done_records(folder)
            changed = sorted(name for name, record in before.items()
                             if after.get(name) != record)
            report.tasks_recomputed += [f"run {self.runs}: {name}" for name in changed]
            report.tasks_done += len(changed) + len(set(after) - set(before))
            if after_kill:
                report.resumes += 1
            if result.rc == -signal.SIGKILL and mode is not None:
                stage, moment = self.locate(result, pending, folder, mode)
                report.kills.append(Kill(mode, at, stage, moment, after_kill))
                if after_kill:
                    report.resumes_killed_again += 1
                self.log(f"kill {len(report.kills):>3}: {mode:<5} at {at:>7}  "
                         f"{stage:<13} {moment}")
                self.check_after_kill(folder)
                after_kill, chained = True, chained + 1
                continue
            if result.rc == 0:
                if after_kill:
                    report.resumes_completed += 1
            else:
                if after_kill:
                    report.resumes_failed += 1
                last = result.stderr.strip().splitlines()[-1:] or [f"status {result.rc}"]
                report.failures.append(f"run {self.runs} exited {result.rc}: {last[0]}")
                self.log(f"run {self.runs} FAILED ({result.rc}): {result.stderr[-2000:]}")
            self.compare(folder)
            report.episodes += 1
            if len(report.kills) >= self.kills:
                break
            folder = self.folder(f"episode-{report.episodes}")
            after_kill, chained = False, 0
        report.seconds = time.perf_counter() - start
        return report


def campaign(root: Path, kills: int = 20, seed: int = 0, chain: int = 1,
             method: str = "cospadi", log=print, fresh: bool = False,
             propagate: str = "original") -> Report:
    """Run the campaign in ``root``; ``fresh``: a new interpreter per run (the ``cospadi``
    command exactly, several seconds of imports each) instead of forks of a warm one."""
    runner = Campaign(root, kills, seed, chain, method, log, fresh, propagate)
    if not fresh:
        runner.server = ForkServer()
    try:
        return runner.execute()
    finally:
        if runner.server is not None:
            runner.server.close()


def summary(report: Report) -> str:
    data = report.as_json()

    def counts(key: str) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(data[key].items()))

    lines = [
        f"kills                    {data['kills']} ({counts('kills_by_mode')}; "
        f"{data['kills_in_a_resume']} of them in a resumed run)",
        f"  by stage               {counts('kills_by_stage')}",
        "  by moment              " + "\n                         ".join(
            f"{v:>3}  {k}" for k, v in sorted(data["kills_by_moment"].items(),
                                             key=lambda kv: -kv[1])),
        f"resumes that completed   {data['resumes_completed']} of {data['resumes']}"
        + (f" ({data['resumes_killed_again']} killed again by plan)"
           if data["resumes_killed_again"] else "")
        + f"; failed {data['resumes_failed']}",
        f"files identical          {data['files_identical']} of {data['files_compared']} "
        f"({data['episodes']} completed runs x {data['files_per_run']} files)",
        f"files corrupt            {data['files_corrupt']}",
        f"stray temp files         {len(data['stray_files'])}",
        f"wrong 'finished' files   {len(data['torn_after_kill'])} (checked after every kill)",
        f"work redone              {data['tasks_recomputed']} finished tasks recomputed, of "
        f"{data['tasks_done']} tasks done",
        f"time                     {data['seconds']:.0f} s (uninterrupted run "
        f"{data['reference_seconds']:.1f} s, {data['reference_write_steps']} write steps)",
        "result                   " + ("PASS" if report.ok else "FAIL"),
    ]
    for key in ("failures", "corrupt", "stray_files", "torn_after_kill", "recomputed"):
        for item in data[key][:10]:
            lines.append(f"  {key}: {item}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chain", type=int, default=1,
                        help="kills per episode: a resume may be killed again up to this")
    parser.add_argument("--method", default="cospadi", choices=("cospadi", "svd-llm"))
    parser.add_argument("--propagate", default="original", choices=("original", "compressed"),
                        help="inputs of later groups (compressed adds the propagate tasks)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", help="folder to work in and keep (default: a temp folder)")
    parser.add_argument("--fresh", action="store_true",
                        help="a new interpreter per run instead of forks of a warm one")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.chain < 1:
        parser.error("--kills and --chain must be >= 1")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.keep:
        root = Path(args.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
        report = campaign(root, args.kills, args.seed, args.chain, args.method, log,
                          args.fresh, args.propagate)
    else:
        with tempfile.TemporaryDirectory(prefix="cospadi-faults-") as tmp:
            report = campaign(Path(tmp), args.kills, args.seed, args.chain, args.method, log,
                              args.fresh, args.propagate)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(summary(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
