"""Tiny random decoder models saved as multi-shard safetensors checkpoints, for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 300  # 256 bytes + a few specials, rounded up

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257,
              pad_token_id=None)


def tiny_config(arch: str, layers: int = 3, **overrides):
    kwargs = dict(COMMON, num_hidden_layers=layers, **overrides)
    if arch == "llama":
        return LlamaConfig(**kwargs)
    if arch == "mistral":
        return MistralConfig(sliding_window=kwargs.pop("sliding_window", 8), **kwargs)
    if arch == "qwen2":
        # alternate sliding and full attention layers: the per-layer mask path
        layer_types = ["sliding_attention" if i % 2 else "full_attention" for i in range(layers)]
        return Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                           layer_types=layer_types, **kwargs)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **kwargs)
    if arch == "gemma3":  # sliding / full layers by pattern, post-MLP norm, scaled embedding
        return Gemma3TextConfig(head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                query_pre_attn_scalar=16, **kwargs)
    raise ValueError(arch)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is a token (GPT-2 style, so the
    Qwen tokenizer classes that transformers picks by model_type read it the same way)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257, "<unk>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_model(path: Path, arch: str = "llama", layers: int = 3, dtype=torch.float32,
               seed: int = 0, max_shard_size: str = "60KB", **overrides) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: make blocks matter
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(path)
    return path


def calib_text(path: Path, chars: int = 20000, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau"]
    out, n = [], 0
    while n < chars:
        w = words[int(torch.randint(len(words), (1,), generator=g))]
        out.append(w)
        n += len(w) + 1
    path.write_text(" ".join(out), encoding="utf-8")
    return path
