"""Float64 Gram accumulation G = X^T X over calibration tokens, one per unique input."""

from __future__ import annotations

import torch

# float64 copy of the tokens made at once: a micro-batch's down_proj input in float64 would
# otherwise be the largest temporary of the capture stage (2048 tokens x 2816 = 44 MiB).
CHUNK_BYTES = 16 << 20


class GramAccumulator:
    """Running sums of X^T X per input name, on the device the inputs arrive on."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.chunk_bytes = chunk_bytes

    def add(self, name: str, inputs: torch.Tensor) -> None:
        tokens = inputs.detach().reshape(-1, inputs.shape[-1])
        d = tokens.shape[1]
        if name not in self.grams:
            self.grams[name] = torch.zeros(d, d, dtype=torch.float64, device=tokens.device)
        gram = self.grams[name]
        rows = max(1, self.chunk_bytes // (8 * d))
        for start in range(0, tokens.shape[0], rows):
            x = tokens[start:start + rows].to(torch.float64)
            gram.addmm_(x.T, x)  # in place: no d x d temporary
