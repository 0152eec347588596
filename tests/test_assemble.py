"""Assembled compressed checkpoints: standalone loading, exact logits, export-dense, inspect,
deterministic bytes. Factors come from simple means (random dictionaries and codes, truncated
SVD), not the solvers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from cospadi.stages.assemble import (
    MODELING_FILE,
    AssembleError,
    assemble_model,
    export_dense,
    inspect_model,
)
from cospadi.stages.factors import DictionaryFactors, LowRankFactors
from cospadi.stages.sizing import dictionary_bytes, dictionary_shape
from cospadi.storage.factor_files import read_block_factors, write_block_factors

SHARD = "24KB"  # several shards even for these tiny models
IDS = [[5, 17, 3, 40, 22, 9, 61, 2]]
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)


def make_model(path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    if arch == "llama":  # biased projections: the bias path
        config = LlamaConfig(attention_bias=True, tie_word_embeddings=False, **COMMON)
    else:  # tied embeddings: no lm_head tensor in the checkpoint
        config = Qwen3Config(head_dim=8, tie_word_embeddings=True, **COMMON)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so blocks matter to the logits
        for name, param in model.named_parameters():
            if "embed" not in name and "norm" not in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size=SHARD)
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def random_dictionary(d1: int, d2: int, g: torch.Generator,
                      dictionary: torch.Tensor | None = None) -> DictionaryFactors:
    shape = dictionary_shape(d1, d2, 0.3, 2.0)
    if dictionary is None:
        dictionary = torch.randn(d1, shape.k, generator=g) * 0.2
    k = dictionary.shape[1]  # a shared dictionary is sized for the whole group
    support = torch.rand(k, d2, generator=g).argsort(dim=0)[:shape.s].sort(dim=0).values
    return DictionaryFactors(dictionary, support, torch.randn(shape.s, d2, generator=g) * 0.5)


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    u, sigma, vh = torch.linalg.svd(weight.T.double(), full_matrices=False)
    root = sigma[:rank].sqrt()
    return LowRankFactors((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float())


def write_factors(model_dir: Path, out: Path, arch: str) -> list[Path]:
    """One file per block. Llama mixes kinds and shares dictionaries: q/k/v of layer 0 in one
    file, gate/up of layers 0 and 1 across two files; Qwen3 is plain per-layer CoSpaDi."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    shared_qkv = torch.randn(32, dictionary_shape(32, 32, 0.3, 2.0).k, generator=g) * 0.2
    shared_mlp = torch.randn(32, dictionary_shape(32, 48, 0.3, 2.0).k, generator=g) * 0.2
    files = []
    for layer, block in enumerate(model.model.layers):
        factors = {}
        for name, module in block.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            full = f"model.layers.{layer}.{name}"
            d1, d2 = module.in_features, module.out_features
            if arch == "llama" and layer == 1 and name in ("self_attn.o_proj", "mlp.down_proj"):
                factors[full] = truncated_svd(module.weight.detach(), 6)
            elif arch == "llama" and layer == 0 and name.endswith(("q_proj", "k_proj", "v_proj")):
                factors[full] = random_dictionary(d1, d2, g, shared_qkv)
            elif arch == "llama" and name.endswith(("gate_proj", "up_proj")):
                factors[full] = random_dictionary(d1, d2, g, shared_mlp)
            else:
                factors[full] = random_dictionary(d1, d2, g)
        path = out / f"block_{layer:03d}.safetensors"
        write_block_factors(path, factors, {"layer": layer, "arch": arch})
        files.append(path)
    return files


def reference_model(model_dir: Path, files: list[Path]) -> torch.nn.Module:
    """The original model with every projection weight set to the decoded factors (bf16
    dictionary, 14-bit values), read back through the factor-file reader."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for path in files:
            for name, factors in read_block_factors(path).items():
                model.get_submodule(name).weight.copy_(factors.dense().T)
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assemble")
    out = {}
    for arch in ("llama", "qwen3"):
        base = root / arch
        base.mkdir()
        original = make_model(base / "original", arch)
        files = write_factors(original, base, arch)
        compressed = assemble_model(original, files, base / "compressed", max_shard_size=SHARD)
        dense = export_dense(compressed, base / "dense", max_shard_size=SHARD)
        out[arch] = dict(original=original, files=files, compressed=compressed, dense=dense)
    return out


LOADER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoCospadi(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "cospadi" or name.startswith("cospadi."):
                raise ImportError(f"blocked: {name}")

    sys.meta_path.insert(0, NoCospadi())
    try:
        import cospadi  # noqa: F401
        raise SystemExit("import hook did not block cospadi")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM

    results = {}
    for arch, path, resave in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        ids = torch.tensor(%r)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
        kinds = sorted({type(m).__name__ for m in model.modules() if "Cospadi" in type(m).__name__})
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.save_pretrained(resave)
        again = AutoModelForCausalLM.from_pretrained(resave, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            resaved_equal = torch.equal(again(ids).logits, logits)
        results[arch] = dict(class_name=type(model).__name__, kinds=kinds, tied=tied,
                             tokens=tokens.tolist(), logits=logits.tolist(),
                             resaved_equal=resaved_equal)
    assert not [m for m in sys.modules if m.split(".")[0] == "cospadi"]
    print("RESULT" + json.dumps(results))
""") % (IDS,)


@pytest.fixture(scope="module")
def loaded(built, tmp_path_factory) -> dict:
    """Load both compressed models in a fresh interpreter that cannot import cospadi."""
    work = tmp_path_factory.mktemp("elsewhere")
    jobs = [(arch, str(b["compressed"]), str(work / f"resaved_{arch}")) for arch, b in
            built.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_standalone_load_and_generate(loaded, arch) -> None:
    result = loaded[arch]
    assert result["class_name"] == "CospadiForCausalLM"
    expected = {"CospadiForCausalLM", "CospadiDictionaryLinear"}
    if arch == "llama":
        expected.add("CospadiLowRankLinear")
    assert set(result["kinds"]) == expected
    assert result["tied"] == (arch == "qwen3")
    assert len(result["tokens"][0]) == 3 + 4
    assert result["resaved_equal"]


# Tolerance: both sides use the very same bf16 dictionary and 14-bit values in float32; they
# differ only in association, (x D) S against x (D S), i.e. float32 rounding (~1e-7 relative)
# summed over <= 48 terms per product and carried through 2 blocks with logits of size ~1:
# measured ~1e-6. One coefficient off by a single 14-bit step (e.g. truncation instead of
# round-to-nearest-even) moved logits by ~2e-3 here, a wrong atom by ~0.2: 5e-5 separates them.
ATOL = 5e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_match_decoded_reference(built, loaded, arch) -> None:
    reference = reference_model(built[arch]["original"], built[arch]["files"])
    with torch.no_grad():
        want = reference(torch.tensor(IDS)).logits
    got = torch.tensor(loaded[arch]["logits"])
    assert want.abs().max() > 0.1  # the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_export_dense_is_plain_and_equal(built, arch) -> None:
    dense_dir = built[arch]["dense"]
    config = json.loads((dense_dir / "config.json").read_text())
    assert "auto_map" not in config and "cospadi" not in config
    assert not (dense_dir / MODELING_FILE).exists()
    assert (dense_dir / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers.models.")
    reference = reference_model(built[arch]["original"], built[arch]["files"])
    with torch.no_grad():
        ids = torch.tensor(IDS)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_compressed_dir_layout(built) -> None:
    out = built["llama"]["compressed"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cospadi.CospadiForCausalLM"
    modules = config["cospadi"]["modules"]
    assert len(modules) == 2 * 7
    # Owner = first in natural order (k_proj < q_proj < v_proj), borrowers name it.
    assert "dictionary_from" not in modules["model.layers.0.self_attn.k_proj"]
    for name in ("q_proj", "v_proj"):
        assert modules[f"model.layers.0.self_attn.{name}"]["dictionary_from"] == \
            "model.layers.0.self_attn.k_proj"
    assert modules["model.layers.1.mlp.gate_proj"]["dictionary_from"] == \
        "model.layers.0.mlp.gate_proj"  # shared across two factor files
    assert modules["model.layers.0.self_attn.q_proj"]["bias"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert "model.layers.0.self_attn.q_proj.weight" not in weight_map
    assert "model.layers.0.self_attn.q_proj.bias" in weight_map
    assert "model.layers.1.mlp.gate_proj.dictionary" not in weight_map
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    source = (out / MODELING_FILE).read_text()
    assert "cospadi." not in source.replace("cospadi.py", "")  # imports nothing of ours


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_inspect_matches_sizing(built, arch) -> None:
    report = inspect_model(built[arch]["compressed"])
    config = json.loads((built[arch]["compressed"] / "config.json").read_text())
    for name, spec in config["cospadi"]["modules"].items():
        figures = report["modules"][name]
        d1, d2 = spec["d1"], spec["d2"]
        if spec["kind"] == "dictionary":
            k, s = spec["k"], spec["s"]
            if arch == "qwen3":  # no shared dictionaries there: plain per-layer sizing
                shape = dictionary_shape(d1, d2, 0.3, 2.0)
                assert (k, s) == (shape.k, shape.s)
                assert figures["bytes"] == shape.bytes and figures["params"] == shape.params
            own = "dictionary_from" not in spec
            assert figures["bytes"] == dictionary_bytes(d1, d2, k, s) - (not own) * 2 * d1 * k
            assert figures["params"] == own * d1 * k + s * d2
        else:
            assert figures["bytes"] == 2 * spec["r"] * (d1 + d2)
        assert figures["dense_bytes"] == 2 * d1 * d2
        assert figures["kept_bytes"] == figures["bytes"] / (2 * d1 * d2)
    for layer in ("0", "1"):
        members = [f for n, f in report["modules"].items() if f".layers.{layer}." in n]
        assert report["layers"][layer]["bytes"] == sum(f["bytes"] for f in members)
        assert report["layers"][layer]["dense_params"] == sum(f["dense_params"] for f in members)
    original = AutoModelForCausalLM.from_pretrained(built[arch]["original"])
    total = sum(p.numel() for p in original.parameters())  # tied weights counted once
    projections = sum(f["dense_params"] for f in report["modules"].values())
    compressed = report["compressed"]
    assert report["model"]["dense_params"] == total
    assert report["model"]["params"] == total - projections + compressed["params"]
    assert report["model"]["bytes"] == 2 * (total - projections) + compressed["bytes"]
    if arch == "qwen3":  # every projection at compression ratio 0.3
        assert abs(compressed["kept_params"] - 0.7) < 0.02
    else:  # sharing and low rank keep less
        assert compressed["kept_params"] < 0.7


def test_assembly_is_deterministic(built, tmp_path) -> None:
    b = built["llama"]
    again = assemble_model(b["original"], list(reversed(b["files"])), tmp_path / "again",
                           max_shard_size=SHARD)
    names = sorted(p.name for p in b["compressed"].iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (b["compressed"] / name).read_bytes(), name


def test_staged_output_and_errors(built, tmp_path) -> None:
    b = built["qwen3"]
    with pytest.raises(FileExistsError):
        assemble_model(b["original"], b["files"], b["compressed"])
    # Factors of the wrong shape: nothing (not even a partial folder) is left behind.
    bad = tmp_path / "bad.safetensors"
    write_block_factors(bad, {"model.layers.0.mlp.down_proj": random_dictionary(
        32, 48, torch.Generator().manual_seed(0))}, {})
    with pytest.raises(AssembleError, match="down_proj"):
        assemble_model(b["original"], [bad], tmp_path / "out")
    with pytest.raises(AssembleError, match="two files"):
        assemble_model(b["original"], b["files"] + b["files"][:1], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
    with pytest.raises(AssembleError, match="not a cospadi"):
        inspect_model(b["original"])


def test_failure_midway_leaves_no_output(built, tmp_path, monkeypatch) -> None:
    import cospadi.stages.assemble as assemble

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(assemble, "copy_side_files", boom)  # after the shards are written
    b = built["qwen3"]
    with pytest.raises(RuntimeError, match="disk full"):
        assemble_model(b["original"], b["files"], tmp_path / "out", max_shard_size=SHARD)
    assert os.listdir(tmp_path) == []


def test_corrupt_original_shard_is_named(built, tmp_path) -> None:
    import shutil

    original = shutil.copytree(built["qwen3"]["original"], tmp_path / "original")
    shard = sorted(original.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(AssembleError, match=shard.name):
        assemble_model(original, built["qwen3"]["files"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
