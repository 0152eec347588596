"""Calibration samples: the text file tokenised into ``samples x seq_len`` token windows.

Every window starts as the model's own tokenizer starts a text (:func:`bos_prefix`): with
BOS for tokenizers that add one (Gemma, Llama), without for those that do not (SmolLM2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

BOS_MODES = ("auto", "always", "never")
_PROBE = "Hello world. A calibration probe."


class CalibrationError(ValueError):
    """Calibration text or settings unusable (the message names the file)."""


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"calibration text {path} is not UTF-8 (invalid byte at offset "
                               f"{err.start})") from err
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty")
    return text


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as err:
        raise CalibrationError(f"cannot load the tokenizer from {model_dir}: {err}") from err


def bos_prefix(tokenizer, mode: str = "auto") -> list[int]:
    """Token ids every window starts with.

    ``auto``: the special tokens the tokenizer itself puts before a text (BOS for Gemma or
    Llama, nothing for SmolLM2 or GPT-2); ``always``: the tokenizer's BOS token;
    ``never``: nothing. Tokenizers that take no ``add_special_tokens`` keyword add nothing.
    """
    if mode not in BOS_MODES:
        raise CalibrationError(f"bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "never":
        return []
    if mode == "always":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise CalibrationError("bos 'always' given but the tokenizer has no BOS token")
        return [int(bos)]
    try:
        full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    except TypeError:  # minimal tokenizers without the keyword
        return []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return [int(t) for t in full[:start]]
    return []


def text_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` alone (no special tokens; windows get their own prefix)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)
    except TypeError:
        enc = tokenizer(text)
    return list(enc["input_ids"])


def window_starts(windows: int, samples: int) -> list[int]:
    """``samples`` windows spread evenly over the ``windows`` available (deterministic)."""
    return [i * windows // samples for i in range(samples)]


def with_prefix(chunks: torch.Tensor, prefix: Sequence[int]) -> torch.Tensor:
    """``prefix`` prepended to every row of ``chunks`` (n x c -> n x (len(prefix) + c))."""
    if not prefix:
        return chunks
    head = torch.tensor(list(prefix), dtype=torch.long).expand(len(chunks), len(prefix))
    return torch.cat([head, chunks], dim=1)


def calibration_ids(text: str, tokenizer, samples: int, seq_len: int,
                    source: str = "calibration text", prefix: Sequence[int] = ()
                    ) -> torch.Tensor:
    """Token ids of shape samples x seq_len from non-overlapping windows of ``text``.

    Each window is ``prefix`` followed by ``seq_len - len(prefix)`` tokens of the text.
    """
    ids = text_ids(tokenizer, text)
    width = seq_len - len(prefix)
    if width < 1:
        raise CalibrationError(f"seq-len {seq_len} leaves no room after the {len(prefix)} "
                               "BOS token(s)")
    windows = len(ids) // width
    if windows < samples:
        raise CalibrationError(
            f"{source} has {len(ids)} tokens: too short for {samples} samples of {seq_len} "
            f"tokens ({samples * width} needed); lower --calib-samples or --seq-len")
    tokens = torch.tensor(ids[: windows * width], dtype=torch.long).view(windows, width)
    return with_prefix(tokens[window_starts(windows, samples)], prefix).contiguous()
