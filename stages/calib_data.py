"""Calibration from a Hugging Face ``datasets`` dataset, and the calibration set of a run.

``--calib-data SPEC`` is a local data file (JSON / JSONL / parquet / arrow / CSV / text), a
glob of them, a folder (``save_to_disk`` output or data files), or a hub id
(``ID`` or ``ID:CONFIG``). Rows come from ``--calib-split`` and ``--calib-column`` (default
``text``, else ``messages``); a column of chat messages (lists of ``{role, content}``) is
rendered with the tokenizer's chat template. Rows are visited in a seeded random order and
either packed (concatenated, then cut into windows) or truncated (one window per row long
enough, shorter rows skipped). Every window starts with the tokenizer's own text prefix
(:func:`~cospadi.stages.calibration.bos_prefix`), added only where a row does not already
start with it (chat templates usually write BOS themselves).

:func:`calibration_set` is the one entry point of the pipeline for both the text file and
the dataset path: it returns the token windows and a digest of what they were made from,
which goes into the resume fingerprint.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calibration import (
    CalibrationError,
    bos_prefix,
    calibration_ids,
    load_tokenizer,
    read_text,
    text_ids,
)

PACKING = ("pack", "truncate")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
            ".csv": "csv", ".txt": "text"}
_TEXT_FORMATS = {".json", ".jsonl", ".csv", ".txt"}


@dataclass(frozen=True)
class CalibrationSet:
    ids: torch.Tensor  # samples x seq_len, long
    digest: dict[str, str]  # kind, content hash, token hash (resume fingerprint)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokens_digest(ids: torch.Tensor) -> str:
    return _sha(ids.to(torch.int64).contiguous().numpy().tobytes())


# --- loading ------------------------------------------------------------------------------

def _check_utf8(path: Path, source: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise CalibrationError(f"{source} is not UTF-8 (invalid byte at offset "
                                       f"{offset + err.start})") from err
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise CalibrationError(f"{source} is not UTF-8 (truncated character at the "
                                   "end)") from err


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    return []


def load_rows(spec: str, split: str):
    """The ``datasets.Dataset`` that ``spec`` names (one split)."""
    source = f"calibration data {spec}"
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError("--calib-data needs the 'datasets' package: "
                               "pip install datasets") from err
    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    files = _local_files(spec)
    try:
        if files:
            suffixes = {f.suffix.lower() for f in files}
            if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
                raise CalibrationError(
                    f"{source}: unsupported file type(s) {', '.join(sorted(suffixes))}; "
                    f"use {', '.join(BUILDERS)}")
            suffix = next(iter(suffixes))
            if suffix in _TEXT_FORMATS:
                for file in files:
                    _check_utf8(file, f"calibration data {file}")
            return datasets.load_dataset(BUILDERS[suffix], data_files=[str(f) for f in files],
                                         split=split)
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise CalibrationError(f"{source} has no split {split!r} (splits: "
                                               f"{', '.join(loaded)})")
                    return loaded[split]
                return loaded
            return datasets.load_dataset(str(path), split=split)
        if spec.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS:
            raise CalibrationError(f"{source} does not exist")
        name, _, config = spec.partition(":")
        return datasets.load_dataset(name, config or None, split=split)
    except CalibrationError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types for one meaning
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CalibrationError(f"{source} (split {split!r}) could not be loaded: "
                               f"{first}") from err


def pick_column(dataset, column: str | None, source: str) -> str:
    names = list(dataset.column_names)
    if column is not None:
        if column not in names:
            raise CalibrationError(f"{source} has no column {column!r} (columns: "
                                   f"{', '.join(names)})")
        return column
    for default in ("text", "messages"):
        if default in names:
            return default
    raise CalibrationError(f"{source} has neither a 'text' nor a 'messages' column "
                           f"(columns: {', '.join(names)}); choose one with --calib-column")


def render_row(value: Any, tokenizer, where: str) -> str:
    """A row's text: a string as is, chat messages through the tokenizer's template."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        if not value:
            return ""
        if any("role" not in m or "content" not in m for m in value):
            raise CalibrationError(f"{where}: chat messages need 'role' and 'content' keys")
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError(f"{where} holds chat messages but the tokenizer has no chat "
                                   "template")
        try:
            return tokenizer.apply_chat_template(value, tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja template errors of any kind
            raise CalibrationError(f"{where}: the chat template failed: {err}") from err
    raise CalibrationError(f"{where} is {type(value).__name__}, expected text or a list of "
                           "chat messages")


# --- windows ------------------------------------------------------------------------------

def _row_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _documents(dataset, column: str, tokenizer, prefix: Sequence[int], seed: int,
               source: str, hasher) -> Iterator[list[int]]:
    """Token ids of each non-empty row in seeded order, each starting with ``prefix``."""
    prefix = list(prefix)
    for index in _row_order(len(dataset), seed):
        text = render_row(dataset[index][column], tokenizer, f"{source} row {index} column "
                                                             f"{column!r}")
        if not text.strip():
            continue
        hasher.update(f"{index}\0{len(text)}\0".encode())
        hasher.update(text.encode("utf-8", "surrogatepass"))
        ids = text_ids(tokenizer, text)
        if prefix and ids[:len(prefix)] != prefix:
            ids = prefix + ids
        yield ids


def pack_windows(docs: Iterator[list[int]], samples: int, seq_len: int,
                 prefix: Sequence[int]) -> tuple[list[list[int]], int]:
    """Documents concatenated and cut into windows; a window that does not begin a document
    gets ``prefix`` in front of ``seq_len - len(prefix)`` tokens. Returns (windows, tokens
    read)."""
    prefix = list(prefix)
    stream: list[int] = []
    windows: list[list[int]] = []
    read = 0
    for doc in docs:
        stream.extend(doc)
        read += len(doc)
        while len(windows) < samples:
            starts = bool(prefix) and stream[:len(prefix)] == prefix
            width = seq_len if (starts or not prefix) else seq_len - len(prefix)
            if len(stream) < width:
                break
            windows.append(stream[:width] if width == seq_len else prefix + stream[:width])
            del stream[:width]
        if len(windows) == samples:
            break
    return windows, read


def truncate_windows(docs: Iterator[list[int]], samples: int, seq_len: int
                     ) -> tuple[list[list[int]], int, int]:
    """The first ``seq_len`` tokens of each document that long. Returns (windows, documents
    seen, documents too short)."""
    windows, seen, short = [], 0, 0
    for doc in docs:
        seen += 1
        if len(doc) < seq_len:
            short += 1
            continue
        windows.append(doc[:seq_len])
        if len(windows) == samples:
            break
    return windows, seen, short


def dataset_ids(dataset, tokenizer, samples: int, seq_len: int, *, column: str | None,
                packing: str, seed: int, prefix: Sequence[int], source: str
                ) -> tuple[torch.Tensor, str]:
    """(samples x seq_len ids, content hash of the rows used)."""
    if packing not in PACKING:
        raise CalibrationError(f"calib-packing must be one of {', '.join(PACKING)}, "
                               f"got {packing!r}")
    if seq_len <= len(prefix):
        raise CalibrationError(f"seq-len {seq_len} leaves no room after the BOS token(s)")
    if len(dataset) == 0:
        raise CalibrationError(f"{source} has no rows")
    col = pick_column(dataset, column, source)
    hasher = hashlib.sha256()
    docs = _documents(dataset, col, tokenizer, prefix, seed, source, hasher)
    if packing == "pack":
        windows, read = pack_windows(docs, samples, seq_len, prefix)
        if len(windows) < samples:
            if read == 0:
                raise CalibrationError(f"{source} has no non-empty rows in column {col!r}")
            raise CalibrationError(
                f"{source} has {read} tokens in column {col!r}: too short for {samples} "
                f"samples of {seq_len} tokens; lower --calib-samples or --seq-len")
    else:
        windows, seen, short = truncate_windows(docs, samples, seq_len)
        if len(windows) < samples:
            if seen == 0:
                raise CalibrationError(f"{source} has no non-empty rows in column {col!r}")
            raise CalibrationError(
                f"{source}: only {len(windows)} of {seen} non-empty rows in column {col!r} "
                f"have {seq_len} tokens ({samples} needed with --calib-packing truncate; "
                f"{short} shorter); use --calib-packing pack, or lower --seq-len or "
                "--calib-samples")
    return torch.tensor(windows, dtype=torch.long), hasher.hexdigest()


# --- the run's calibration set ------------------------------------------------------------

def calibration_set(cfg, model_dir: str | Path, tokenizer=None) -> CalibrationSet:
    """The token windows of a run (``cfg``: a CompressConfig) and their digest.

    Built once per run, by the driver (its digest enters the resume fingerprint), and
    handed to the tasks that embed it: tokenising a large text file is seconds of CPU.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    prefix = bos_prefix(tokenizer, cfg.bos)
    if cfg.calib_data:
        source = f"calibration data {cfg.calib_data}"
        dataset = load_rows(cfg.calib_data, cfg.calib_split)
        ids, content = dataset_ids(dataset, tokenizer, cfg.calib_samples, cfg.seq_len,
                                   column=cfg.calib_column, packing=cfg.calib_packing,
                                   seed=cfg.seed, prefix=prefix, source=source)
        kind = "data"
    elif cfg.calib_text:
        path = Path(cfg.calib_text)
        text = read_text(path)
        ids = calibration_ids(text, tokenizer, cfg.calib_samples, cfg.seq_len,
                              source=f"calibration text {path}", prefix=prefix)
        content = _sha(text.encode("utf-8"))
        kind = "text"
    else:
        raise CalibrationError("calib-text or calib-data is required (a UTF-8 text file, or "
                               "a dataset: local JSON / JSONL / parquet files or a hub id)")
    # where the data lives is left out: a moved file with the same content resumes
    return CalibrationSet(ids.contiguous(), {"kind": kind, "content": content,
                                             "tokens": tokens_digest(ids)})
