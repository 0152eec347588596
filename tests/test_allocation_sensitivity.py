"""The streamed sensitivity pass of --allocation-weight loss: block by block from the
stored inputs, equal to the whole model's backward, resumable, in the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import config_from_args, main, parse
from cospadi.pipeline.config import ConfigError
from cospadi.pipeline.sensitivity_tasks import build_head
from cospadi.stages.block_inputs import BlockInputs
from cospadi.stages.build_block import build_block, load_skeleton
from cospadi.stages.calib_data import calibration_set
from cospadi.stages.projections import PROJECTIONS
from cospadi.stages.sensitivity import block_backward, head_gradient, sensitivities
from cospadi.storage.shards import ShardReader

SAMPLES, SEQ = 5, 24


def whole_model(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype, micro: int
                ) -> dict[str, float]:
    """The reference: one forward and backward of the whole model (transformers' own),
    a = sum ||dL/dy||^2 / tokens / d_out from backward hooks on every projection."""
    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    sums: dict[str, float] = {}
    for layer, block in enumerate(net.model.layers):
        for projection in PROJECTIONS:
            key = f"{projection}@{layer}"
            sums[key] = 0.0

            def hook(_m, _gin, gout, key=key):
                sums[key] += float(gout[0].double().square().sum())
            block.get_submodule(projection).register_full_backward_hook(hook)
    for lo in range(0, len(ids), micro):
        batch = ids[lo:lo + micro]
        logits = net(batch).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          batch[:, 1:].reshape(-1), reduction="sum").backward()
    dims = {p: net.model.layers[0].get_submodule(p).out_features for p in PROJECTIONS}
    return {key: value / ids.numel() / dims[key.partition("@")[0]]
            for key, value in sums.items()}


def streamed(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype, micro: int
             ) -> dict[str, float]:
    """The stage's functions block by block from the top, activations and gradients in
    memory (the pipeline keeps them on disk)."""
    skeleton, reader = load_skeleton(model_dir), ShardReader(model_dir)
    inputs = BlockInputs(skeleton, reader, dtype)
    hidden = [inputs.embed(ids)]
    blocks = [build_block(skeleton, reader, layer, dtype) for layer in range(
        skeleton.num_layers)]
    with torch.no_grad():
        for layer, block in enumerate(blocks[:-1]):
            hidden.append(block(hidden[-1], **inputs.layer_kwargs(layer, len(ids),
                                                                  ids.shape[1])))
    output_grad = head_gradient(build_head(skeleton, reader, dtype, torch.device("cpu")), ids)
    out: dict[str, float] = {}
    for layer in reversed(range(skeleton.num_layers)):
        grad = torch.empty_like(hidden[layer])

        def write(lo: int, g: torch.Tensor, grad: torch.Tensor = grad) -> None:
            grad[lo:lo + len(g)] = g
        sums, _ = block_backward(blocks[layer], layer, inputs.layer_kwargs,
                                 lambda lo, hi, layer=layer: hidden[layer][lo:hi],
                                 output_grad, write, len(ids), micro, dtype,
                                 torch.device("cpu"))
        dims = {p: blocks[layer].get_submodule(p).out_features for p in sums}
        out.update({f"{p}@{layer}": v for p, v in sensitivities(
            sums, ids.numel(), dims).items()})

        def output_grad(lo, hi, _out, grad=grad):
            return grad[lo:hi], 0.0
    return out


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_streamed_equals_whole_model_float64(tmp_path, arch, tied):
    """Block-by-block backpropagation gives the whole model's a_j (float64: the only
    difference is the summation order, so agreement to ~1e-12 relative; 1e-9 allowed).
    qwen2: alternating sliding/full attention masks and a head tied to the embedding."""
    model_dir = make_model(tmp_path / "m", arch, layers=3, tie_word_embeddings=tied)
    ids = torch.randint(0, 256, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))
    reference = whole_model(model_dir, ids, torch.float64, micro=SAMPLES)
    ours = streamed(model_dir, ids, torch.float64, micro=2)  # other micro-batches
    assert set(ours) == set(reference) and len(ours) == 3 * 7
    assert all(v > 0 for v in ours.values())
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-9), key
    # a_j spans orders of magnitude across matrices: a non-trivial comparison
    assert max(ours.values()) / min(ours.values()) > 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    return root, make_model(root / "model", "llama", layers=3), calib_text(root / "calib.txt")


def compress_args(model, text, out, *extra: str) -> list[str]:
    return ["-q", "compress", "--model", str(model), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ), "--iters",
            "2", "--ratio", "0.4", "--micro-batch", "2", "--torch-threads", "1",
            "--allocation", "global", "--allocation-weight", "loss", *extra]


def read_blocks(work: Path) -> dict[str, float]:
    out = {}
    for path in sorted((work / "sensitivity").glob("block_*.json")):
        data = json.loads(path.read_text())
        out.update({f"{p}@{data['layer']}": v for p, v in data["sensitivity"].items()})
    return out


def test_pipeline_stage_matches_whole_model_and_cleans_up(tiny):
    """The run measures a_j itself (no file to copy), equal to the whole model's backward
    over the same calibration windows, then removes the block inputs and gradients."""
    root, model, text = tiny
    out = root / "run"
    assert main(compress_args(model, text, out)) == 0
    work = root / "run.work"
    measured = read_blocks(work)
    cfg = config_from_args(parse(compress_args(model, text, out)[1:]))
    ids = calibration_set(cfg, str(model)).ids
    reference = whole_model(model, ids, torch.float32, micro=SAMPLES)
    assert set(measured) == set(reference)
    for key, value in reference.items():
        # float32 through 3 blocks, summed in another order: ~1e-6 relative; 1e-4 allowed
        assert measured[key] == pytest.approx(value, rel=1e-4), key
    summary = json.loads((work / "allocation.json").read_text())
    assert summary["proxy"] <= summary["uniform_proxy"]
    assert not list((work / "activations").glob("*.zarr"))
    assert not list((work / "sensitivity").glob("grad_*.zarr"))
    assert (out / "config.json").is_file()


def test_killed_sensitivity_pass_resumes_to_the_same_result(tiny, monkeypatch):
    """SIGKILL while a gradient store is half written, then after block 0's sensitivities
    are written but before its record: each rerun keeps the finished tasks, and the a_j and
    the allocation equal an uninterrupted run's."""
    root, model, text = tiny
    work, saved = root / "kill.work", root / "saved.work"

    def trace_of(name: str) -> list[str]:
        trace = root / f"{name}.trace"
        monkeypatch.setenv("COSPADI_FAULT_TRACE", str(trace))
        assert main(compress_args(model, text, root / name)) == 0
        monkeypatch.delenv("COSPADI_FAULT_TRACE")
        return [line.split("\t")[2] for line in trace.read_text().splitlines()]

    def killed_at(point: int) -> None:
        proc = subprocess.run([sys.executable, "-m", "cospadi.pipeline.cli",
                               *compress_args(model, text, root / "kill")],
                              env=dict(os.environ, COSPADI_FAULT_KILL_AT=str(point)),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert not (work / "allocation.json").exists()

    labels = trace_of("ref")
    killed_at(next(i for i, label in enumerate(labels, 1)
                   if "grad_0001.zarr" in label and "chunk" in label))
    done = {p.name: p.read_bytes() for p in (work / "done").iterdir()}
    assert "sensitivity-0002.json" in done and "sensitivity-0001.json" not in done
    # where the resumed run writes block 0's a_j: from a copy's trace (the resumed run's
    # task order need not follow the first run's)
    shutil.copytree(work, saved)
    labels = trace_of("kill")
    shutil.rmtree(work)
    shutil.rmtree(root / "kill")
    saved.rename(work)
    killed_at(next(i for i, label in enumerate(labels, 1)
                   if label.endswith("sensitivity/block_0000.json")))
    now = {p.name: p.read_bytes() for p in (work / "done").iterdir()}
    assert all(now[name] == data for name, data in done.items())  # not recomputed
    assert "sensitivity-0001.json" in now and "sensitivity-0000.json" not in now
    assert main(compress_args(model, text, root / "kill")) == 0
    assert read_blocks(work) == read_blocks(root / "ref.work")
    assert (json.loads((work / "allocation.json").read_text())["units"]
            == json.loads((root / "ref.work" / "allocation.json").read_text())["units"])


def test_sensitivity_samples_subset(tiny, capsys):
    """--sensitivity-samples N backpropagates the first N windows only; it is checked
    against calib-samples and is part of the fingerprint."""
    root, model, text = tiny
    with pytest.raises(ConfigError, match="sensitivity-samples"):
        config_from_args(parse(compress_args(model, text, root / "x",
                                             "--sensitivity-samples", "6")[1:]))
    out = root / "subset"
    assert main(compress_args(model, text, out, "--sensitivity-samples", "2",
                              "--keep-work")) == 0
    work = root / "subset.work"
    block = json.loads((work / "sensitivity" / "block_0002.json").read_text())
    assert block["samples"] == 2
    cfg = config_from_args(parse(compress_args(model, text, out)[1:]))
    ids = calibration_set(cfg, str(model)).ids[:2]
    reference = whole_model(model, ids, torch.float32, micro=2)
    for key, value in read_blocks(work).items():
        assert value == pytest.approx(reference[key], rel=1e-4), key  # as above
    capsys.readouterr()
    assert main(compress_args(model, text, out, "--sensitivity-samples", "3",
                              "--keep-work")) == 2
    assert "sensitivity-samples 2 -> 3" in capsys.readouterr().err
