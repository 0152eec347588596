"""The inputs the model's own forward hands each decoder layer.

Rather than re-deriving masks and rotary embeddings, run the base model's real forward
with every decoder layer replaced by a recorder and stop at the layer we need (GPTQModel's
trick): whatever the forward does before the layers (embedding scaling, position ids,
causal or sliding-window masks per ``config.layer_types``, rotary embeddings) is then
exactly what a layer would see. Only the embedding and rotary modules hold real memory.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..storage.shards import ShardReader
from .build_block import ArchitectureError, ModelSkeleton, build_embedding, build_rotary


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, stop_at: int, seen: dict[int, tuple[torch.Tensor, dict]]):
        super().__init__()
        self.index, self.stop_at, self.seen = index, stop_at, seen

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:  # transformers 5 passes everything but hidden_states by keyword
            raise ArchitectureError(f"the model's forward passes {len(args)} positional "
                                    "extras to its decoder layers; expected keywords only")
        self.seen[self.index] = (hidden_states, kwargs)
        if self.index == self.stop_at:
            raise _Stop
        return hidden_states


class BlockInputs:
    """Embeds token ids and produces each layer's keyword arguments, the model's way."""

    def __init__(self, skeleton: ModelSkeleton, reader: ShardReader | None,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.skeleton, self.dtype, self.device = skeleton, dtype, torch.device(device)
        # meta, no storage; the layers are left out of the copy (memo): deep-copying every
        # meta layer only to drop them cost ~0.4 s per task, a scan's third on SmolLM2
        base = skeleton.base
        self._driver = copy.deepcopy(base, memo={id(base.layers): nn.ModuleList()})
        rotary = build_rotary(skeleton, self.device)
        if rotary is not None:
            self._driver.rotary_emb = rotary
        if hasattr(self._driver, "norm"):
            self._driver.norm = nn.Identity()
        if reader is not None:
            self._driver.set_input_embeddings(build_embedding(skeleton, reader, dtype,
                                                              self.device))
        self._kwargs_cache: dict[tuple[int, int, int], dict[str, Any]] = {}

    def _run(self, stop_at: int, **inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        seen: dict[int, tuple[torch.Tensor, dict]] = {}
        self._driver.layers = nn.ModuleList(
            _Recorder(i, stop_at, seen) for i in range(self.skeleton.num_layers))
        try:
            with torch.no_grad():
                self._driver(use_cache=False, **inputs)
        except _Stop:
            pass
        finally:
            self._driver.layers = nn.ModuleList()
        if stop_at not in seen:
            raise ArchitectureError(f"the model's forward never reached decoder layer "
                                    f"{stop_at} of {self.skeleton.base_prefix}.layers")
        return seen[stop_at]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 (the embedding plus whatever the forward adds)."""
        hidden, _ = self._run(0, input_ids=input_ids.to(self.device))
        return hidden.to(self.dtype)

    def layer_kwargs(self, index: int, batch: int, seq_len: int) -> dict[str, Any]:
        """Keyword arguments of layer ``index`` for inputs of shape batch x seq_len."""
        key = (index, batch, seq_len)
        if key not in self._kwargs_cache:
            hidden_size = self.skeleton.config.hidden_size
            probe = torch.zeros(batch, seq_len, hidden_size, dtype=self.dtype, device=self.device)
            _, kwargs = self._run(index, inputs_embeds=probe)
            self._kwargs_cache[key] = kwargs
        return self._kwargs_cache[key]
