"""SIGKILL in the middle of a run, then the same command again: byte-identical outputs.

The kills are injected in a subprocess by wrapping a write function so that the process
kills itself at a known point: mid-capture (between two activation chunk writes), mid-
factorisation (one block file of a group written, the other not) and mid-assembly (shards
staged, config not yet written). One chain of runs resumes past each kill in turn; tasks
finished before a kill must not run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import calib_text, make_model

from cospadi.pipeline.cli import main

# Runs cospadi in a child that SIGKILLs itself on the N-th call of a wrapped function.
DRIVER = r"""
import importlib, os, signal, sys
module_name, attr, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner_name, _, func_name = attr.rpartition(".")
module = importlib.import_module(module_name)
owner = getattr(module, owner_name) if owner_name else module
original = getattr(owner, func_name)
calls = [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, func_name, wrapped)
from cospadi.pipeline.cli import main
sys.exit(main(sys.argv[4:]))
"""

# Loads the output with stock transformers while every cospadi module is unimportable.
BLOCKED_LOAD = r"""
import json, sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cospadi" or name.startswith("cospadi."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True,
                                             dtype=torch.float32).eval()
ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 64]])
with torch.no_grad():
    logits = model(ids).logits[0, -1]
generated = model.generate(ids, max_new_tokens=4, do_sample=False)
assert not any(m.startswith("cospadi") for m in sys.modules)
print(json.dumps({"logits": logits.tolist(), "generated": generated[0].tolist()}))
"""

KILLS = [
    # (module, function, call at which to die): what is torn at that moment
    ("cospadi.storage.activation_store", "ActivationWriter.write", 5),  # capture of block 1
    ("cospadi.storage.factor_files", "write_block_factors", 2),  # group (0, 1) half written
    ("cospadi.stages.assemble", "write_json", 1),  # shards staged, no config yet
]


def _args(model, text, out, work):
    return ["-q", "compress", "--model", str(model), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", "6", "--seq-len", "24", "--micro-batch", "4",
            "--iters", "3", "--group-size", "2", "--work-dir", str(work)]


def _files(root: Path, *dirs: str) -> dict[str, bytes]:
    out = {}
    for sub in dirs:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def _records(work: Path) -> dict[str, tuple[int, bytes]]:
    done = work / "done"
    if not done.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.iterdir()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_model(root / "model", "llama", layers=3)
    text = calib_text(root / "calib.txt")
    ref = root / "ref"
    assert main(_args(model, text, ref / "out", ref / "work")) == 0
    return root, model, text, _files(ref, "out", "work/factors")


def test_sigkill_then_resume_is_byte_identical(setup):
    root, model, text, reference = setup
    run = root / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for module, function, nth in KILLS:
        before = _records(run / "work")
        proc = subprocess.run([sys.executable, "-c", DRIVER, module, function, str(nth),
                               *_args(model, text, run / "out", run / "work")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (function, proc.returncode, proc.stderr[-2000:])
        after = _records(run / "work")
        for name, record in before.items():  # resumed: nothing done before ran again
            assert after[name] == record, f"{name} was recomputed after resume"
        assert len(after) > len(before), f"no progress before the kill in {function}"
        assert not (run / "out" / "config.json").exists()
    before = _records(run / "work")
    assert main(_args(model, text, run / "out", run / "work")) == 0
    after = _records(run / "work")
    assert all(after[name] == record for name, record in before.items())
    assert _files(run, "out", "work/factors") == reference
    leftovers = [p.name for p in (run / "work").rglob("*.partial")]
    assert leftovers == []
    assert json.loads((run / "out" / "config.json").read_text())["cospadi"]


def test_output_loads_without_cospadi(setup):
    import torch
    from transformers import AutoModelForCausalLM

    root, *_ = setup
    out = root / "ref" / "out"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(out)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["generated"]) == 12
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([[5, 17, 99, 3, 42, 7, 8, 64]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)
