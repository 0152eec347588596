"""Perplexity protocol on a tiny random Llama (CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cospadi.stages.evaluate import load_model_for_eval, perplexity, tokenize, windows_of

VOCAB = 61


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """Stand-in tokenizer: one token per character."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def reference_ppl(model, ids: torch.Tensor, seq_len: int, n: int) -> float:
    # The plain loop everyone writes: HF loss per window (mean over seq_len - 1 tokens).
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seq_len : (i + 1) * seq_len][None]
            losses.append(model(input_ids=w, labels=w).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_matches_hand_loop(model):
    ids = torch.randint(0, VOCAB, (10 * 16 + 7,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, None, ids, seq_len=16, progress=False)
    assert res["windows"] == 10  # ragged tail of 7 dropped
    assert res["tokens"] == 10 * 15
    assert res["text_tokens"] == 167
    assert res["ppl"] == pytest.approx(reference_ppl(model, ids, 16, 10), rel=1e-5)
    assert res["nll"] == pytest.approx(math.log(res["ppl"]))


def test_max_windows_batch_and_determinism(model):
    ids = torch.randint(0, VOCAB, (9 * 8,), generator=torch.Generator().manual_seed(2))
    a = perplexity(model, None, ids, seq_len=8, max_windows=4, progress=False)
    b = perplexity(model, None, ids, seq_len=8, max_windows=4, progress=False)
    c = perplexity(model, None, ids, seq_len=8, max_windows=4, batch_size=3, progress=False)
    assert a == b  # bit-identical across runs
    assert a["windows"] == 4 and a["tokens"] == 4 * 7
    assert c["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    assert a["ppl"] == pytest.approx(reference_ppl(model, ids, 8, 4), rel=1e-5)
    assert perplexity(model, None, ids, seq_len=8, max_windows=100, progress=False)[
        "windows"
    ] == 9


def test_string_input_uses_tokenizer(model):
    text = "the quick brown fox jumps over the lazy dog. " * 4
    ids = tokenize(CharTokenizer(), text)
    assert ids.numel() == len(text)
    res = perplexity(model, CharTokenizer(), text, seq_len=32, progress=False)
    assert res["windows"] == len(text) // 32
    assert res == perplexity(model, None, ids, seq_len=32, progress=False)


def test_too_short_and_bad_seq_len(model):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, None, torch.arange(5), seq_len=16, progress=False)
    with pytest.raises(ValueError):
        windows_of(torch.arange(10), 1)


def test_random_model_near_uniform(model):
    # Untrained model: perplexity must be close to the vocabulary size, a sanity anchor.
    ids = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(3))
    assert 0.5 * VOCAB < perplexity(model, None, ids, seq_len=64, progress=False)["ppl"] < 2 * VOCAB


def test_load_model_for_eval_roundtrip(model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded, tok = load_model_for_eval(tmp_path, "cpu", "float32")
    assert not loaded.training
    text = " ".join(f"w{(7 * i) % (VOCAB - 1)}" for i in range(64))
    ids = tokenize(tok, text)
    assert ids.tolist()[:3] == [0, 7, 14]
    got = perplexity(loaded, tok, text, seq_len=16, progress=False)
    assert got == perplexity(model, None, ids, seq_len=16, progress=False)
