"""ReplaceMe depth pruning: the streamed run equals a whole-model computation with hooks.

Tiny random Llama / Qwen3 (least-squares fit) and Gemma3 (post-MLP norm: the window is
dropped, and the per-layer sliding / full pattern must survive the cut), 5 blocks, N = 2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import main
from cospadi.pipeline.manifest import WorkDir
from cospadi.pipeline.prune_tasks import read_transform
from cospadi.stages.calibration import calibration_ids, load_tokenizer, read_text
from cospadi.stages.replaceme import (
    RIDGE,
    angular_distance_sum,
    cosine_batches,
    fit_cosine,
    fold_down_proj,
    solve_transform,
)

SAMPLES, SEQ, LAYERS, N = 6, 24, 5, 2
IDS = [[5, 17, 99, 3, 42, 7, 8, 64, 120, 33, 2, 250]]

# Loads the pruned output with stock transformers, no trust_remote_code, cospadi blocked.
PLAIN_LOAD = r"""
import json, sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cospadi" or name.startswith("cospadi."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits[0]
print(json.dumps({"logits": logits.tolist(), "layers": len(model.model.layers),
                  "types": getattr(model.config, "layer_types", None)}))
"""


# unit checks --------------------------------------------------------------------------------

def test_solve_and_fold_match_direct_least_squares():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(400, 16, generator=g, dtype=torch.float64)
    b = m @ torch.randn(16, 16, generator=g, dtype=torch.float64) + \
        0.1 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    mtm, mtb = m.T @ m, m.T @ b
    solved = solve_transform(mtm, mtb)
    ridge = RIDGE * mtm.diagonal().mean()
    expected = torch.linalg.solve(mtm + ridge * torch.eye(16, dtype=torch.float64), mtb)
    # well-conditioned 16 x 16 solve in float64: agreement to ~1e-12 expected
    torch.testing.assert_close(solved.matrix, expected, rtol=1e-9, atol=1e-10)
    assert solved.path == "cholesky"
    # a rank-deficient M^T M still solves (ridge), finite
    singular = solve_transform(mtm[:, :1] @ mtm[:1, :], mtb)
    assert torch.isfinite(singular.matrix).all()

    weight = torch.randn(16, 24, generator=g, dtype=torch.float64)  # down_proj: out x in
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    folded, folded_bias = fold_down_proj(weight, bias, solved.matrix)
    torch.testing.assert_close(x @ folded.T + folded_bias,
                               (x @ weight.T + bias) @ solved.matrix, rtol=1e-12, atol=1e-12)


def test_angular_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    total, count = angular_distance_sum(a, b)
    assert count == 3  # right angle 1/2, same direction 0, zero vector counted as 1/2
    assert total == pytest.approx(1.0, abs=1e-7)


# pipeline against the whole model ---------------------------------------------------------

def _reference(model_dir, text):
    """Whole model, fp32, hooks: inputs of every block, last block's output, MLP outputs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = calibration_ids(read_text(text), load_tokenizer(model_dir), SAMPLES, SEQ)
    hidden, mlp = {}, {}
    handles = []
    layers = model.model.layers
    for index, layer in enumerate(layers):
        def pre(_m, args, kwargs, index=index):
            hidden[index] = (args[0] if args else kwargs["hidden_states"]).double()
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.mlp.register_forward_hook(
            lambda _m, _a, out, index=index: mlp.__setitem__(index, out.double())))
    handles.append(layers[-1].register_forward_hook(
        lambda _m, _a, out: hidden.__setitem__(len(layers), (
            out[0] if isinstance(out, tuple) else out).double())))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return model, hidden, mlp


def _mean_distance(a, b):
    total, count = angular_distance_sum(a, b)
    return total / count


@pytest.mark.parametrize("arch,fit", [("llama", "lstsq"), ("qwen3", "lstsq"),
                                      ("llama", "cosine"), ("gemma3", "drop")])
def test_streamed_pruning_matches_whole_model(tmp_path, arch, fit):
    model_dir = make_model(tmp_path / "model", arch, layers=LAYERS)
    text = calib_text(tmp_path / "calib.txt")
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(["-q", "compress", "--model", str(model_dir), "--out", str(out), "--calib-text",
               str(text), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ),
               "--micro-batch", "4", "--method", "none", "--prune-blocks", str(N),
               "--prune-fit", fit, "--work-dir", str(work), "--dtype", "float32"])
    assert rc == 0
    section = json.loads((out / "config.json").read_text())["cospadi_prune"]
    model, hidden, mlp = _reference(model_dir, text)

    # distances of every window of 1..N blocks (float64 from the same fp32 activations:
    # the streamed and whole-model hidden states differ by fp32 rounding only)
    expected = {n: {s: _mean_distance(hidden[s], hidden[s + n])
                    for s in range(1, LAYERS - n + 1)} for n in range(1, N + 1)}
    got = {int(n): {int(s): d for s, d in row.items()}
           for n, row in section["distances"].items()}
    assert got.keys() == expected.keys()
    for n in expected:
        assert got[n].keys() == expected[n].keys()
        for s in expected[n]:
            assert got[n][s] == pytest.approx(expected[n][s], abs=1e-6)
    start = min(expected[N], key=lambda s: (expected[N][s], s))
    assert section["removed"] == [start, start + N]

    down = model.model.layers[start - 1].mlp.down_proj
    if fit == "lstsq":
        m = mlp[start - 1].reshape(-1, hidden[0].shape[-1])
        b = (hidden[start + N] - hidden[start]).reshape(m.shape) + m
        mtm, mtb = m.T @ m, m.T @ b
        ridge = RIDGE * mtm.diagonal().mean()
        t_ref = torch.linalg.solve(mtm + ridge * torch.eye(m.shape[1], dtype=torch.float64),
                                   mtb)
        t = read_transform(WorkDir(work))["transform"]
        # fp32 activations (relative rounding ~1e-7) through a solve whose condition number
        # here is ~1e3: 1e-4 relative is what agreement allows, a wrong fit is off by O(1)
        assert (t - t_ref).norm() / t_ref.norm() < 1e-4
        identity_error = (t_ref - torch.eye(len(t_ref), dtype=torch.float64)).norm()
        assert identity_error > 1e-2  # T really is a fitted map, not the identity
    if fit == "cosine":
        # Adam over the whole model's rows in the pipeline's batch order (micro-batch 4,
        # seed 42): the streamed rows differ from these by fp32 rounding only
        d = hidden[0].shape[-1]
        rows = [mlp[start - 1], hidden[start] - mlp[start - 1], hidden[start + N]]

        def read(lo, hi):
            return tuple(r[lo:hi].reshape(-1, d).float() for r in rows)
        t_ref, losses = fit_cosine(d, lambda e: cosine_batches(read, SAMPLES, 4, 42, e))
        t = read_transform(WorkDir(work))["transform"]
        # 20 Adam steps from the same start on rows equal to fp32 rounding: 1e-4 relative
        # allows that rounding; T moves from the identity by O(1e-2) per step, so other rows
        # or another batch order land far outside it
        assert (t - t_ref).norm() / t_ref.norm() < 1e-4
        assert losses[-1] < losses[0]  # the fit lowers the cosine loss
        assert section["cosine_loss"] == pytest.approx(losses, rel=1e-4)
        eye = torch.eye(d, dtype=torch.float64)
        assert (t - eye).norm() > 1e-2  # moved away from dropping the window
    if fit in ("lstsq", "cosine"):
        with torch.no_grad():
            down.weight.copy_((t.T @ down.weight.double()).float())
    # the whole-model reference of the same pruning: drop the window's modules
    with torch.no_grad():
        keep = [i for i in range(LAYERS) if not start <= i < start + N]
        model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
        model.config.num_hidden_layers = len(keep)
        expected_logits = model(torch.tensor(IDS)).logits[0]

    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(IDS)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == LAYERS - N
    if arch == "gemma3":  # the pattern of the kept layers, not the original pattern re-applied
        original = json.loads((model_dir / "config.json").read_text())["layer_types"]
        assert result["types"] == [original[i] for i in keep]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits,
                               rtol=1e-5, atol=1e-5)


def test_prune_then_compress_assembles_and_loads(tmp_path):
    model_dir = make_model(tmp_path / "model", "llama", layers=LAYERS)
    text = calib_text(tmp_path / "calib.txt")
    out = tmp_path / "out"
    args = ["-q", "compress", "--model", str(model_dir), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ), "--method",
            "cospadi", "--iters", "1", "--prune-blocks", str(N), "--dtype", "float32"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS - N
    assert "cospadi" in config and "cospadi_prune" in config
    layers = {name.split(".")[2] for name in config["cospadi"]["modules"]}
    assert layers == {str(i) for i in range(LAYERS - N)}
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    assert torch.isfinite(logits).all()
    # the work directory's intermediates are gone, the run is complete
    work = tmp_path / "out.work"
    assert not (work / "pruned").exists() and not (work / "prune" / "scan").exists()
    assert main(args) == 0  # nothing left to do


@pytest.mark.parametrize("extra,message", [
    (["--prune-blocks", "5"], "prune-blocks 5 leaves no block before the window"),
    (["--prune-blocks", "0", "--method", "none"], "needs prune-blocks >= 1"),
    (["--prune-blocks", "-1"], "prune-blocks must be >= 0"),
    (["--prune-blocks", "2", "--prune-fit", "cos"], "prune_fit must be one of"),
])
def test_bad_prune_settings(tmp_path, capsys, extra, message):
    model_dir = make_model(tmp_path / "model", "llama", layers=LAYERS)
    text = calib_text(tmp_path / "calib.txt")
    rc = main(["compress", "--model", str(model_dir), "--out", str(tmp_path / "out"),
               "--calib-text", str(text), "--calib-samples", "2", "--seq-len", "16", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fit", ["lstsq", "cosine"])
def test_post_mlp_norm_refuses_a_folded_map(tmp_path, capsys, fit):
    model_dir = make_model(tmp_path / "model", "gemma3", layers=4)
    text = calib_text(tmp_path / "calib.txt")
    rc = main(["compress", "--model", str(model_dir), "--out", str(tmp_path / "out"),
               "--calib-text", str(text), "--calib-samples", "2", "--seq-len", "16",
               "--method", "none", "--prune-blocks", "1", "--prune-fit", fit])
    assert rc == 2
    err = capsys.readouterr().err
    assert "post_feedforward_layernorm" in err and f"prune-fit {fit}" in err


def test_dry_run_prints_distance_table(tmp_path, capsys):
    model_dir = make_model(tmp_path / "model", "llama", layers=4)
    text = calib_text(tmp_path / "calib.txt")
    rc = main(["-q", "compress", "--model", str(model_dir), "--out", str(tmp_path / "out"),
               "--calib-text", str(text), "--calib-samples", "2", "--seq-len", "16",
               "--method", "svd-llm", "--prune-blocks", "2", "--dry-run"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "on 2 blocks" in printed  # the plan is for the pruned depth
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows][-3:] == ["1", "2", "3"]  # window starts, never 0
    assert sum(cell.endswith("*") for row in rows for cell in row) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
    assert not list(tmp_path.glob(".cospadi-scan-*"))
    assert math.isfinite(float(rows[-3][1]))


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_killed_prune_resumes_byte_identical(tmp_path, monkeypatch, capsys):
    """SIGKILL mid-scan (a store half written), then with the fitted map written aside but
    not renamed; each rerun keeps the finished tasks and the output equals an uninterrupted
    run's bytes."""
    model_dir = make_model(tmp_path / "model", "llama", layers=3)  # windows [1, 2), [2, 3)
    text = calib_text(tmp_path / "calib.txt")

    def args(name):
        return ["-q", "compress", "--model", str(model_dir), "--out", str(tmp_path / name),
                "--calib-text", str(text), "--calib-samples", str(SAMPLES), "--seq-len",
                str(SEQ), "--micro-batch", "4", "--method", "none", "--prune-blocks", "1"]

    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("COSPADI_FAULT_TRACE", str(trace))
    assert main(args("ref")) == 0
    monkeypatch.delenv("COSPADI_FAULT_TRACE")
    labels = [line.split("\t")[2] for line in trace.read_text().splitlines()]
    first = next(i for i, label in enumerate(labels, 1) if ".h_0002.zarr.partial chunk" in label)
    resumed_from = next(i for i, label in enumerate(labels, 1)
                        if label.endswith("done/prune-scan-0000.json"))
    second = next(i for i, label in enumerate(labels, 1)
                  if label.endswith("transform.safetensors")) - resumed_from
    work = tmp_path / "run.work"
    records: dict[str, bytes] = {}
    for kill in (first, second):
        proc = subprocess.run([sys.executable, "-m", "cospadi.pipeline.cli", *args("run")],
                              env=dict(os.environ, COSPADI_FAULT_KILL_AT=str(kill)),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stderr[-2000:]
        now = {p.name: p.read_bytes() for p in (work / "done").iterdir()}
        assert all(now[name] == data for name, data in records.items())  # not recomputed
        assert len(now) > len(records)
        records = now
        assert not (tmp_path / "run").exists()
    assert main(args("run")) == 0
    assert _tree(tmp_path / "run") == _tree(tmp_path / "ref")
    assert not list(work.rglob("*.partial"))
    # the fingerprint covers the pruning settings
    capsys.readouterr()
    assert main([*args("run"), "--prune-blocks", "2"]) == 2
    assert "prune-blocks 1 -> 2" in capsys.readouterr().err


# prune-only speed: the in-memory handover, the background writes, tokenising once -----------

def _prune_args(model_dir, text, out):
    return ["-q", "compress", "--model", str(model_dir), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ),
            "--micro-batch", "4", "--method", "none", "--prune-blocks", str(N),
            "--dtype", "float32"]


def test_handover_in_memory_equals_reading_the_store(tmp_path, monkeypatch):
    """Each scan takes its input and the state N blocks back from the previous scan in
    memory; with the handover off (HANDOVER_BYTES 0: large activations) every scan reads
    both from the stores. Same bytes out."""
    from cospadi.pipeline import prune_tasks

    model_dir = make_model(tmp_path / "model", "llama", layers=LAYERS)
    text = calib_text(tmp_path / "calib.txt")
    opened: list[str] = []

    class Counting(prune_tasks.ActivationReader):
        def __init__(self, path):
            opened.append(Path(path).name)
            super().__init__(path)

    monkeypatch.setattr(prune_tasks, "ActivationReader", Counting)
    assert main(_prune_args(model_dir, text, tmp_path / "memory")) == 0
    # the scans read only the embedding's output h_0 (scan 0's input; no window starts at
    # block 0); the last two opened are the fit's h_{l-1} and h_{l+N}
    assert opened[:-2] == ["h_0000.zarr"], opened
    opened.clear()
    monkeypatch.setattr(prune_tasks, "HANDOVER_BYTES", 0)
    assert main(_prune_args(model_dir, text, tmp_path / "store")) == 0
    # every scan reads its input, and scans N.. the state N blocks back
    assert len(opened) - 2 == LAYERS + (LAYERS - N), opened
    assert _tree(tmp_path / "memory") == _tree(tmp_path / "store")


def test_overlapped_writer_raises_and_commits_nothing(tmp_path):
    from cospadi.storage.activation_store import OverlappedWriter, write_activations

    class Failing:
        def __init__(self, sink):
            self.sink, self.calls = sink, 0

        def write(self, start, hidden):
            self.calls += 1
            if self.calls == 2:
                raise OSError("disk full")
            self.sink.write(start, hidden)

    target = tmp_path / "h.zarr"
    with pytest.raises(OSError, match="disk full"):
        with write_activations(target, (4, 3, 2), torch.float32, 2) as store, \
                OverlappedWriter(Failing(store)) as sink:
            sink.write(0, torch.ones(2, 3, 2))
            sink.write(2, torch.ones(2, 3, 2))  # fails in the background
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_prune_then_compress_tokenises_once(tmp_path, monkeypatch):
    """The driver tokenises the calibration set once and hands it to both embed tasks
    (prune-embed on the original model, embed on the pruned one)."""
    from cospadi.stages import calib_data

    calls = []
    original = calib_data.calibration_ids
    monkeypatch.setattr(calib_data, "calibration_ids",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model_dir = make_model(tmp_path / "model", "llama", layers=LAYERS)
    text = calib_text(tmp_path / "calib.txt")
    args = _prune_args(model_dir, text, tmp_path / "out")
    assert main([*args[:-6], "--method", "svd-llm", "--ratio", "0.3", "--prune-blocks",
                 str(N)]) == 0
    assert len(calls) == 1


def test_block_inputs_leave_the_skeleton_whole(tmp_path):
    """The driver copy leaves the layers out (memo) without touching the shared skeleton."""
    from cospadi.stages.block_inputs import BlockInputs
    from cospadi.stages.build_block import load_skeleton

    skeleton = load_skeleton(make_model(tmp_path / "model", "llama", layers=LAYERS))
    inputs = BlockInputs(skeleton, None, torch.float32)
    assert len(skeleton.base.layers) == LAYERS and len(inputs._driver.layers) == 0
    assert "position_embeddings" in inputs.layer_kwargs(LAYERS - 1, 2, SEQ)
    assert len(BlockInputs(skeleton, None, torch.float32)._driver.layers) == 0


def test_all_finite_fast_path_and_overflow():
    from cospadi.storage.shards import all_finite

    assert all_finite(torch.randn(64, 8).bfloat16())
    assert not all_finite(torch.tensor([1.0, float("nan")]).bfloat16())
    assert not all_finite(torch.tensor([1.0, float("-inf")], dtype=torch.float64))
    # the sum overflows although every entry is finite: the exact check decides
    assert all_finite(torch.tensor([3e38, 3e38]))
