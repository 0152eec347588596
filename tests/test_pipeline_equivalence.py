"""The streamed pipeline computes what the full transformers model computes.

For each architecture: Grams and block inputs stored in the work dir equal those of the
full model run with hooks (fp32), and the assembled model's logits equal a full-model
forward with every projection replaced by the D S read back from the factor files.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import main
from cospadi.pipeline.manifest import WorkDir
from cospadi.stages.calibration import calibration_ids, load_tokenizer, read_text
from cospadi.stages.projections import INPUTS, PROJECTIONS
from cospadi.storage.activation_store import ActivationReader
from cospadi.storage.factor_files import read_block_factors
from cospadi.storage.gram_store import read_grams

SAMPLES, SEQ = 6, 24


def _reference(model_dir, text_path):
    """Full model in fp32 with hooks: layer inputs and float64 Grams of each unique input."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = calibration_ids(read_text(text_path), load_tokenizer(model_dir), SAMPLES, SEQ)
    layer_inputs, grams = {}, {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        def pre(_m, args, kwargs, index=index):
            layer_inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        for name, projections in INPUTS.items():
            def hook(_m, args, index=index, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[(index, name)] = x.T @ x
            handles.append(layer.get_submodule(projections[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return model, ids, layer_inputs, grams


@pytest.mark.parametrize("arch,method,group,dtype", [
    ("llama", "svd-llm", 1, torch.bfloat16), ("mistral", "cospadi", 1, torch.float32),
    ("qwen2", "svd-llm", 2, torch.float16), ("qwen3", "cospadi", 2, torch.float32)])
def test_pipeline_matches_full_model(tmp_path, arch, method, group, dtype):
    """Checkpoints in bf16 / fp16 are computed in fp32 by both sides."""
    model_dir = make_model(tmp_path / "model", arch, layers=3, dtype=dtype)
    text = calib_text(tmp_path / "calib.txt")
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(["-q", "compress", "--model", str(model_dir), "--out", str(out),
               "--calib-text", str(text), "--calib-samples", str(SAMPLES), "--seq-len",
               str(SEQ), "--micro-batch", "4", "--method", method, "--iters", "2",
               "--group-size", str(group), "--work-dir", str(work), "--keep-work",
               "--dtype", "float32"])
    assert rc == 0
    model, ids, layer_inputs, ref_grams = _reference(model_dir, text)
    paths = WorkDir(work)
    for index in range(3):
        stored = ActivationReader(paths.activations(index)).read(0, SAMPLES)
        torch.testing.assert_close(stored, layer_inputs[index], rtol=1e-5, atol=1e-5)
        grams, tokens = read_grams(paths.grams(index))
        assert tokens == SAMPLES * SEQ
        for name in INPUTS:
            ref = ref_grams[(index, name)]
            scale = ref.abs().max().item()
            torch.testing.assert_close(grams[name], ref, rtol=1e-5, atol=1e-6 * scale)

    # replace every projection by D S as stored, then compare logits with the output
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            factors = read_block_factors(paths.factors(index))
            for projection in PROJECTIONS:
                dense = factors[f"model.layers.{index}.{projection}"].dense()
                layer.get_submodule(projection).weight.copy_(dense.T)
        expected = model(ids).logits
    assembled = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                     trust_remote_code=True).eval()
    with torch.no_grad():
        got = assembled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compressed_propagation_feeds_compressed_outputs(tmp_path):
    """With --propagate compressed, block 1 sees block 0's compressed output."""
    model_dir = make_model(tmp_path / "model", "llama", layers=2)
    text = calib_text(tmp_path / "calib.txt")
    work = tmp_path / "work"
    rc = main(["-q", "compress", "--model", str(model_dir), "--out", str(tmp_path / "out"),
               "--calib-text", str(text), "--calib-samples", str(SAMPLES), "--seq-len",
               str(SEQ), "--method", "svd-llm", "--propagate", "compressed",
               "--work-dir", str(work), "--keep-work"])
    assert rc == 0
    model, ids, layer_inputs, _ = _reference(model_dir, text)
    with torch.no_grad():
        factors = read_block_factors(WorkDir(work).factors(0))
        for projection in PROJECTIONS:
            dense = factors[f"model.layers.0.{projection}"].dense()
            model.model.layers[0].get_submodule(projection).weight.copy_(dense.T)
        seen = {}

        def record(_m, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]

        handle = model.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
        model(ids)
        handle.remove()
    stored = ActivationReader(WorkDir(work).activations(1)).read(0, SAMPLES)
    torch.testing.assert_close(stored, seen["h"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stored, layer_inputs[1], atol=1e-3)  # differs from dense


@pytest.mark.parametrize("model_type,extra", [
    ("gemma3_text", dict(head_dim=16, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"])),
    ("gemma2", dict(head_dim=16, sliding_window=8)),
    ("granite", dict(embedding_multiplier=3.0, residual_multiplier=0.5))])
def test_other_architectures_stream_exactly(tmp_path, model_type, extra):
    """Scaled embeddings, per-layer masks, kernels without sdpa: whatever the model's own
    forward does before its layers, the streamed blocks see the same inputs."""
    from transformers import AutoConfig

    from cospadi.stages.block_inputs import BlockInputs
    from cospadi.stages.build_block import build_block, load_skeleton
    from cospadi.storage.shards import ShardReader

    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64,
                                  intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=2, **extra)
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(config).eval()
    full.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    ids = torch.randint(3, 300, (2, 20))
    seen = {}
    for index, layer in enumerate(full.model.layers):
        def record(_m, args, kwargs, index=index):
            seen[index] = args[0] if args else kwargs["hidden_states"]
        layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        full(ids)
        skeleton, reader = load_skeleton(tmp_path / "m"), ShardReader(tmp_path / "m")
        inputs = BlockInputs(skeleton, reader, torch.float32)
        hidden = inputs.embed(ids)
        torch.testing.assert_close(hidden, seen[0], rtol=0, atol=0)
        block = build_block(skeleton, reader, 0, torch.float32)
        hidden = block(hidden, **inputs.layer_kwargs(0, 2, 20))
    torch.testing.assert_close(hidden, seen[1], rtol=1e-6, atol=1e-6)
