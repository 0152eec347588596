"""Hidden states between blocks, on disk in zarr: samples x seq_len x hidden.

One chunk per micro-batch so a forward writes exactly the chunks it owns. Stored without a
compressor: hidden states' mantissas are noise, so Blosc/lz4 with byte shuffle saved only
~5 % (float32) to ~9 % (bfloat16) of the bytes on SmolLM2 activations at 2-3x the CPU of
an uncompressed write (0.09 against 0.03 CPU-s per 19 MB), a cost every capture and every
ReplaceMe scan paid. bfloat16 has no zarr dtype, so it is stored bit-exactly as uint16;
resume therefore needs no replay and gives the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from . import faults
from .durable_dir import atomic_dir

_STORED = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "uint16"}


class ActivationWriter:
    def __init__(self, array: zarr.Array, dtype: torch.dtype):
        self.array, self.dtype = array, dtype

    def write(self, start: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if self.dtype == torch.bfloat16:
            data = hidden.view(torch.uint16).numpy()
        else:
            data = hidden.numpy()
        self.array[start:start + data.shape[0]] = data
        faults.point(f"{getattr(self.array.store, 'root', self.array.store)} chunk {start}")


@contextlib.contextmanager
def write_activations(path: str | Path, shape: tuple[int, int, int], dtype: torch.dtype,
                      micro_batch: int) -> Iterator[ActivationWriter]:
    """Create the store at ``path`` (atomically: visible only once fully written)."""
    if dtype not in _STORED:
        raise ValueError(f"cannot store activations of dtype {dtype}")
    with atomic_dir(path) as tmp:
        array = zarr.create_array(
            store=str(tmp), shape=shape, chunks=(micro_batch, shape[1], shape[2]),
            dtype=_STORED[dtype], compressors=None,
            attributes={"torch_dtype": str(dtype).removeprefix("torch.")})
        yield ActivationWriter(array, dtype)


class OverlappedWriter:
    """Writes each micro-batch in a background thread while the caller computes the next;
    at most one write in flight, so at most one batch waits in memory. Leave the context
    (all writes done, errors raised) before committing the store."""

    def __init__(self, sink: ActivationWriter):
        self.sink = sink
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cospadi-write")
        self._pending: Future | None = None

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self._wait()
        self._pending = self._pool.submit(self.sink.write, start, hidden)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> OverlappedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._wait()
        finally:
            self._pool.shutdown(wait=True)


class ActivationReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.array = zarr.open_array(str(self.path), mode="r")
        self.dtype = getattr(torch, self.array.attrs["torch_dtype"])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        data = np.ascontiguousarray(self.array[start:stop])
        tensor = torch.from_numpy(data)
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor
