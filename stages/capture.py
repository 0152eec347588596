"""Run a decoder block over stored activations in micro-batches, capturing projection inputs.

Forward pre-hooks on the first projection of each unique input (q for q/k/v, gate for
gate/up, o, down) feed a float64 Gram accumulator; the block's outputs go to the next
activation store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..storage.activation_store import ActivationReader, ActivationWriter
from .grams import GramAccumulator
from .projections import INPUTS

KwargsFor = Callable[[int, int, int], dict[str, Any]]  # (layer, batch, seq_len) -> kwargs


def micro_batches(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _hook_grams(block: nn.Module, accumulator: GramAccumulator) -> list:
    handles = []
    for name, projections in INPUTS.items():
        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            accumulator.add(name, args[0])
        handles.append(block.get_submodule(projections[0]).register_forward_pre_hook(hook))
    return handles


def capture_block(block: nn.Module, layer: int, kwargs_for: KwargsFor,
                  source: ActivationReader, micro_batch: int, dtype: torch.dtype,
                  device: torch.device, sink: ActivationWriter | None = None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """Grams of every unique input of ``block`` over all stored samples, and the token count.

    With a ``sink`` the block's outputs are written there too (the next block's inputs).
    """
    accumulator = GramAccumulator()
    handles = _hook_grams(block, accumulator)
    samples, seq_len, _ = source.shape
    try:
        with torch.no_grad():
            for start, stop in micro_batches(samples, micro_batch):
                hidden = source.read(start, stop).to(device=device, dtype=dtype)
                out = block(hidden, **kwargs_for(layer, stop - start, seq_len))
                if sink is not None:
                    sink.write(start, out)
    finally:
        for handle in handles:
            handle.remove()
    return accumulator.grams, samples * seq_len


def forward_blocks(blocks: Sequence[tuple[int, nn.Module]], kwargs_for: KwargsFor,
                   source: ActivationReader, sink: ActivationWriter, micro_batch: int,
                   dtype: torch.dtype, device: torch.device) -> None:
    """Push every stored sample through consecutive ``(layer, block)`` pairs into ``sink``."""
    samples, seq_len, _ = source.shape
    with torch.no_grad():
        for start, stop in micro_batches(samples, micro_batch):
            hidden = source.read(start, stop).to(device=device, dtype=dtype)
            for layer, block in blocks:
                hidden = block(hidden, **kwargs_for(layer, stop - start, seq_len))
            sink.write(start, hidden)
