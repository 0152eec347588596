"""Runtime form of the compressed model: resident memory equals the stored bytes, structured
supports (2:4, block) and the fused Triton kernel (under Triton's CPU interpreter), and
grouped SVD-LLM sizes equal the plan."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import main
from cospadi.pipeline.compress import preflight
from cospadi.pipeline.config import CompressConfig
from cospadi.pipeline.manifest import WorkDir
from cospadi.pipeline.plan import make_plan
from cospadi.stages import supports
from cospadi.stages.assemble import inspect_model
from cospadi.stages.projections import PROJECTIONS
from cospadi.storage import modeling_template
from cospadi.storage.factor_files import read_block_factors

SAMPLES, SEQ, LAYERS = 4, 24, 2


def _compress(tmp_path: Path, *extra: str) -> tuple[Path, Path, Path]:
    model_dir = make_model(tmp_path / "model", "llama", layers=LAYERS, dtype=torch.bfloat16)
    text = calib_text(tmp_path / "calib.txt")
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(["-q", "compress", "--model", str(model_dir), "--out", str(out), "--calib-text",
               str(text), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ),
               "--iters", "1", "--work-dir", str(work), "--keep-work", "--dtype", "float32",
               *extra])
    assert rc == 0
    return model_dir, out, work


def _stored_bytes(out: Path) -> dict[str, int]:
    """Bytes of every tensor in the output shards, by name."""
    sizes: dict[str, int] = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                sizes[key] = handle.get_tensor(key).untyped_storage().nbytes()
    return sizes


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage a module holds: parameters, buffers and any
    tensor kept in a plain attribute (a cache would show up here)."""
    storages: dict[int, int] = {}
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for value in vars(module).values():
        if isinstance(value, tuple):
            tensors += [v for v in value if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _compressed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (modeling_template.CospadiDictionaryLinear, modeling_template.CospadiLowRankLinear)
    return {name: m for name, m in model.named_modules() if type(m).__name__ in
            {k.__name__ for k in kinds}}


def _factor_reference(model_dir: Path, work: Path) -> torch.nn.Module:
    """The original model in float32 with every projection replaced by its stored factors."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            factors = read_block_factors(WorkDir(work).factors(index))
            for projection in PROJECTIONS:
                dense = factors[f"model.layers.{index}.{projection}"].dense()
                layer.get_submodule(projection).weight.copy_(dense.T)
    return model


@pytest.mark.parametrize("support", ["free", "2:4", "block16"])
def test_resident_memory_is_stored_bytes_and_logits_match(tmp_path, support):
    model_dir, out, work = _compress(tmp_path, "--support", support)
    spec = json.loads((out / "config.json").read_text())["cospadi"]["modules"]
    assert all(s.get("support", "free") == support for s in spec.values())
    stored = _stored_bytes(out)

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.bfloat16).eval()
    modules = _compressed_modules(model)
    assert len(modules) == LAYERS * len(PROJECTIONS)
    on_disk = sum(size for key, size in stored.items() if key.rpartition(".")[0] in modules)
    dense = sum(2 * s["d1"] * s["d2"] for s in spec.values())
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111]])
    for moment in ("after load", "after a forward", "after generating"):
        if moment == "after a forward":
            with torch.no_grad():
                model(ids)
        elif moment == "after generating":
            model.generate(ids, max_new_tokens=4, do_sample=False)
        held = sum(_held_bytes(m) for m in modules.values())
        # bf16 load of a bf16 / packed checkpoint: exactly the bytes on disk, nothing more
        assert held == on_disk, moment
    # 0.70 of the dense parameters are kept; the packed support costs a few % on top
    assert on_disk <= 0.75 * dense

    if support == "2:4":
        for index in range(LAYERS):
            for name, factors in read_block_factors(
                    WorkDir(work).factors(index)).items():
                mask = torch.zeros(factors.k, factors.support.shape[1], dtype=torch.bool)
                mask.scatter_(0, factors.support, True)
                assert supports.is_two_four(mask), name

    # logits of the compressed model (float32) = the original with W = D S from the files
    compressed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                      dtype=torch.float32).eval()
    reference = _factor_reference(model_dir, work)
    with torch.no_grad():
        # float32 on both sides, the same products in a different order
        torch.testing.assert_close(compressed(ids).logits, reference(ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["svd-llm", "cospadi"])
def test_grouped_sizes_equal_plan(tmp_path, method):
    """A group's shared factor (SVD-LLM's left factor, CoSpaDi's dictionary) is stored and
    held once: bytes on disk and in memory are the plan's."""
    model_dir, out, _ = _compress(tmp_path, "--method", method, "--group-size", "2")
    cfg = CompressConfig(model=str(model_dir), out=str(out), method=method, group_size=2,
                         calib_text=str(tmp_path / "calib.txt"), calib_samples=SAMPLES,
                         seq_len=SEQ)
    _, skeleton, reader = preflight(cfg)
    plan = make_plan(cfg, skeleton, reader)
    planned = sum(m.bytes * m.count for m in plan.matrices)
    figures = inspect_model(out)
    assert figures["compressed"]["bytes"] == planned  # the shared factor stored once
    assert abs(figures["compressed"]["kept_bytes"] - plan.kept_bytes) < 0.01
    spec = json.loads((out / "config.json").read_text())["cospadi"]["modules"]
    borrowers = [name for name, s in spec.items()
                 if ("left_from" if method == "svd-llm" else "dictionary_from") in s]
    assert len(borrowers) == 5  # q, k, v, gate, up of the second layer
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.bfloat16)
    held = sum(_held_bytes(m) for m in _compressed_modules(model).values())
    assert held == planned


def test_selectors_are_exact_and_structured():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 24, generator=g)
    two_four = supports.select_two_four(scores)
    assert supports.is_two_four(two_four)
    blocks = supports.select_blocks(scores, 5, 8)
    assert (blocks.sum(dim=0) == 5).all()
    assert (blocks.reshape(16, 3, 8) == blocks.reshape(16, 3, 8)[:, :, :1]).all()
    free = supports.select_free(scores, 8)
    # with an orthonormal dictionary the kept energy decides the error: the structured
    # choices can keep at most what the free one keeps, and each beats random valid ones
    kept = {name: float(scores[m].square().sum())
            for name, m in (("free", free), ("2:4", two_four))}
    assert kept["2:4"] <= kept["free"] + 1e-6
    for _ in range(20):
        rand = supports.select_two_four(torch.randn(16, 24, generator=g))
        assert float(scores[rand].square().sum()) <= kept["2:4"] + 1e-6
        rand_blocks = supports.select_blocks(torch.randn(16, 24, generator=g), 5, 8)
        assert float(scores[rand_blocks].square().sum()) <= \
            float(scores[blocks].square().sum()) + 1e-6
    # the rule form (squared gains -> s x d2 indices) selects the same supports
    for name, mask in (("2:4", two_four), ("block8", blocks), ("free", free)):
        s = int(mask[:, 0].sum())
        rule = supports.as_rule(supports.parse_support(name))(scores.square(), s)
        assert torch.equal(torch.zeros_like(mask).scatter_(0, rule, True), mask), name
    with pytest.raises(ValueError, match="block<B>"):
        supports.parse_support("blocks")


KERNEL_CHECK = """
import torch
from cospadi.storage import cospadi_kernels as kernels, modeling_template
from cospadi.storage.sparse_format import pack_codes

assert kernels.AVAILABLE
g = torch.Generator().manual_seed(1)
k, s, d2, d1 = 45, 13, 70, 20  # none a multiple of the kernel's tile sizes
support = torch.rand(k, d2, generator=g).argsort(dim=0)[:s].sort(dim=0).values
values = torch.randn(s, d2, generator=g)
packed = pack_codes(support, values, k)
layer = modeling_template.CospadiDictionaryLinear(d1, d2, k, s, bias=False,
                                                  owns_dictionary=True)
with torch.no_grad():
    layer.mask.copy_(packed["mask"])
    layer.values14.copy_(packed["values14"])
for dtype in (torch.float32, torch.bfloat16):
    for rows in (1, 20):  # one row tile, then two (20 > block_m = 16)
        z = torch.randn(rows, k, generator=g).to(dtype)
        torch_path = layer.codes_product(z).float()
        fused = kernels.codes_matmul(z, packed["mask"], packed["values14"], k, s, d2,
                                     block_m=16, block_n=32, block_k=16).float()
        # float32: the same products summed in another order; bf16: one output rounding
        # (8 bits of mantissa) on sums of 13 terms of size ~|z| |v| ~ 3
        tol = 1e-5 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(fused, torch_path, rtol=tol, atol=tol)
print("kernel ok")
"""


def test_fused_kernel_matches_torch_path():
    """The Triton kernel under Triton's CPU interpreter (set before triton is imported,
    hence a fresh interpreter) against the modeling file's torch path."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel ok" in done.stdout


def test_block_layer_small_and_large_batch_agree():
    g = torch.Generator().manual_seed(3)
    d1, d2, k, s, block = 24, 32, 20, 6, 8
    layer = modeling_template.CospadiDictionaryLinear(d1, d2, k, s, bias=True,
                                                      owns_dictionary=True, support="block8")
    index = torch.rand(d2 // block, k, generator=g).argsort(dim=1)[:, :s].sort(dim=1).values
    with torch.no_grad():
        layer.dictionary.copy_(torch.randn(k, d1, generator=g))  # D^T
        layer.index.copy_(index.to(torch.int16))
        layer.values.copy_(torch.randn(d2 // block, s, block, generator=g))
        layer.bias.copy_(torch.randn(d2, generator=g))
    codes = torch.zeros(k, d2)
    for b in range(d2 // block):
        codes[index[b], b * block:(b + 1) * block] = layer.values[b]
    weight = layer.dictionary.detach().T @ codes
    for rows in (1, modeling_template.SMALL_BATCH + 1):  # gather + bmm, then dense decode
        x = torch.randn(rows, d1, generator=g)
        torch.testing.assert_close(layer(x), x @ weight + layer.bias.detach(),
                                   rtol=1e-5, atol=1e-5)
    before = _held_bytes(layer)
    assert before == 4 * (d1 * k + (d2 // block) * s * block + d2) + 2 * math.prod(index.shape)
