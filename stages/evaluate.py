"""Perplexity over a text, WikiText-2 protocol (as in GPTQ / SVD-LLM / CoSpaDi).

Tokenize the whole text once, cut it into non-overlapping windows of ``seq_len`` tokens
(the ragged tail is dropped), run each window independently, and report
``exp(mean NLL)`` over every predicted token (``seq_len - 1`` per window). Every window
starts as the model's tokenizer starts a text (``bos``: BOS for Gemma or Llama, nothing
for SmolLM2), so with BOS a window is BOS + ``seq_len - 1`` text tokens, all predicted
(as lm-evaluation-harness scores a document that fits one window); without, the first
token of a window is context only. Windows are fixed by the text alone, so dense and
compressed models are scored on identical tokens.

    python -m cospadi.stages.evaluate MODEL_DIR TEXT_FILE [--seq-len 512] [--max-windows 40]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import bos_prefix, text_ids, with_prefix


def tokenize(tokenizer: Callable[..., Any], text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D LongTensor (tokenizer defaults for special tokens)."""
    # verbose=False: a whole corpus is "longer than model_max_length" on purpose.
    try:
        enc = tokenizer(text, verbose=False)
    except TypeError:  # minimal tokenizers without the keyword
        enc = tokenizer(text)
    ids = enc["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
               prefix: Sequence[int] = ()) -> torch.Tensor:
    """(n_windows, seq_len): ``prefix`` + the next ``seq_len - len(prefix)`` tokens of
    ``ids``, for the first whole windows."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 (a window predicts seq_len - 1 tokens)")
    width = seq_len - len(prefix)
    if width < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room after the {len(prefix)} BOS token(s)")
    n = ids.numel() // width
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"text has {ids.numel()} tokens: fewer than one window of {seq_len}")
    return with_prefix(ids[: n * width].view(n, width), prefix)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Callable[..., Any] | None,
    text: str | torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    bos: str = "auto",
) -> dict[str, float | int]:
    """Perplexity of ``model`` on ``text`` (a string, or token ids with ``tokenizer=None``).

    A string is tokenised without special tokens and every window starts with
    ``bos_prefix(tokenizer, bos)``; token ids are windowed as given.

    Returns ``ppl``, ``nll`` (mean, nats), ``tokens`` (predicted tokens = windows *
    (seq_len - 1)), ``windows``, ``seq_len`` and ``text_tokens`` (all tokens of the text).
    The first ``max_windows`` windows are used when given. Deterministic: fixed windows,
    no sampling, per-token NLL summed in float64.
    """
    prefix: list[int] = []
    if isinstance(text, torch.Tensor):
        ids = text
    else:
        ids = torch.tensor(text_ids(tokenizer, text), dtype=torch.long)
        prefix = bos_prefix(tokenizer, bos)
    ids = ids.reshape(-1).long()
    wins = windows_of(ids, seq_len, max_windows, prefix)
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    bar = tqdm(total=len(wins), desc=f"ppl@{seq_len}", unit="win", disable=not progress)
    try:
        for start in range(0, len(wins), batch_size):
            batch = wins[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Softmax over the vocabulary in float32 even for bf16 models (bf16 reductions
            # over ~50k logits are too coarse for perplexity comparisons).
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll.double())
            count += batch[:, 1:].numel()
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    mean = total_nll / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "windows": len(wins),
        "seq_len": seq_len,
        "text_tokens": ids.numel(),
    }


def load_model_for_eval(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a checkpoint folder, in eval mode on ``device``.

    trust_remote_code: compressed checkpoints ship their own modeling file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Perplexity of a checkpoint on a text file.")
    ap.add_argument("model_dir")
    ap.add_argument("text_file")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bos", default="auto", choices=("auto", "always", "never"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_model_for_eval(args.model_dir, args.device, args.dtype)
    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()
    res = perplexity(model, tok, text, args.seq_len, args.max_windows, args.device,
                     args.batch_size, bos=args.bos)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
