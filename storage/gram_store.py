"""Calibration Grams on disk: one float64 d x d array per unique input of a block, in zarr.

Compressed with Blosc/zstd (numcodecs) and chunked so a 28672-wide Gram never needs one
huge buffer to write; a CRC32C per chunk catches silent corruption. The token count the
Gram was accumulated over is kept in the store's attributes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import faults
from .durable_dir import atomic_dir

CHUNK = 1024


def write_grams(path: str | Path, grams: dict[str, torch.Tensor], tokens: int) -> None:
    """Write ``{input_name: G}`` and the token count atomically as one zarr group."""
    with atomic_dir(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", attributes={"tokens": int(tokens)})
        for name in sorted(grams):
            gram = grams[name].detach().to(device="cpu", dtype=torch.float64).numpy()
            chunk = min(CHUNK, gram.shape[0])
            array = group.create_array(
                name, shape=gram.shape, chunks=(chunk, chunk), dtype="float64",
                compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                             Crc32cCodec()])
            for start in range(0, gram.shape[0], chunk):  # a row of chunks at a time
                array[start:start + chunk] = gram[start:start + chunk]
            faults.point(f"{tmp} array {name}")


def read_grams(path: str | Path, names: list[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], int]:
    group = zarr.open_group(str(path), mode="r")
    names = sorted(group.array_keys()) if names is None else names
    grams = {name: torch.from_numpy(np.ascontiguousarray(group[name][:])) for name in names}
    return grams, int(group.attrs["tokens"])
