"""Reading tensor headers of, and writing, sharded Hugging Face safetensors checkpoints.

Writers stream: each shard's tensors are produced by callables when that shard is written,
so memory holds one shard at most. Output bytes depend only on the inputs (names sorted
naturally, greedy packing, metadata ``{"format": "pt"}`` only, sorted JSON).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_json, write_with

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint file is missing or unreadable (the message names it)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: split digits out and compare them as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parse_size(size: int | str) -> int:
    """Bytes from an int or "500KB" / "2GB" (powers of 10) / "1GiB" (powers of 2)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot parse size {size!r}")
        base = 1024 if match.group(3) else 1000
        power = " KMGT".index(match.group(2).upper() or " ")
        value = int(float(match.group(1)) * base ** power)
    if value < 1:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def file_tensors(path: Path) -> dict[str, TensorInfo]:
    """Header of one safetensors file, without reading tensor data."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for name in handle.keys():
                sl = handle.get_slice(name)
                out[name] = TensorInfo(path, _DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
            return out
    except (SafetensorError, OSError, KeyError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable: {err}") from err


def checkpoint_tensors(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (index-listed shards or a single file) by name."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"index {index} is corrupt: {err}") from err
        files = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE_NAME).is_file():
        weight_map, files = None, [SINGLE_NAME]
    else:
        raise CheckpointError(f"{model_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")
    out: dict[str, TensorInfo] = {}
    for file in files:
        out.update(file_tensors(model_dir / file))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{index} lists tensors absent from the shards: {missing[:5]}")
    return out


class TensorSource:
    """Loads tensors from many safetensors files with one file open (memory-mapped) at a
    time: the pages a mapping has touched count in RSS until it is unmapped, so keeping
    every source file open made assembly's peak grow with the model's size."""

    def __init__(self) -> None:
        self._file: Path | None = None
        self._handle: object | None = None

    def get(self, info: TensorInfo, name: str) -> torch.Tensor:
        if info.file != self._file:
            self.close()
            self._handle = safe_open(str(info.file), framework="pt")
            self._file = info.file
        try:
            return self._handle.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read {name} from {info.file}: {err}") from err

    def close(self) -> None:
        self._handle = None  # safe_open handles unmap when dropped
        self._file = None


@dataclass(frozen=True)
class OutTensor:
    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


def write_shards(out_dir: Path, tensors: list[OutTensor], max_shard_bytes: int) -> int:
    """Write ``model-XXXXX-of-YYYYY.safetensors`` + index; returns the total tensor bytes."""
    tensors = sorted(tensors, key=lambda t: natural_key(t.name))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the output checkpoint")
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for tensor in shard:
            value = tensor.load().contiguous()
            if value.numel() * value.element_size() != tensor.nbytes:
                raise ValueError(f"{tensor.name}: produced {value.numel() * value.element_size()}"
                                 f" bytes, planned {tensor.nbytes}")
            data[tensor.name] = value
            weight_map[tensor.name] = file
            total += tensor.nbytes
        write_with(out_dir / file,
                   lambda tmp, data=data: save_file(data, str(tmp), metadata={"format": "pt"}))
        del data
    write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def is_side_file(name: str) -> bool:
    """Tokenizer, generation config, license, README...: everything but weights and config."""
    return not (name == "config.json" or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES)
                or name.endswith(".index.json"))


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and is_side_file(path.name) and path.name not in skip:
            write_with(dst / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
            copied.append(path.name)
    return copied
