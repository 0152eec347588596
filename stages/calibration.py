"""Calibration samples: the text file tokenised into ``samples x seq_len`` token windows."""

from __future__ import annotations

from pathlib import Path

import torch


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


def window_starts(windows: int, samples: int) -> list[int]:
    """``samples`` windows spread evenly over the ``windows`` available (deterministic)."""
    return [i * windows // samples for i in range(samples)]


def calibration_ids(text: str, tokenizer, samples: int, seq_len: int,
                    source: str = "calibration text") -> torch.Tensor:
    """Token ids of shape samples x seq_len from non-overlapping windows of ``text``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows < samples:
        raise CalibrationError(
            f"{source} has {len(ids)} tokens: too short for {samples} samples of {seq_len} "
            f"tokens ({samples * seq_len} needed); lower --calib-samples or --seq-len")
    tokens = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return tokens[window_starts(windows, samples)].contiguous()
