"""Float64 Gram accumulation G = X^T X over calibration tokens, one per unique input."""

from __future__ import annotations

import torch


def gram_of(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X of the tokens in ``inputs`` (... x d), accumulated in float64."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    return x.T @ x


class GramAccumulator:
    """Running sums of X^T X per input name, on the device the inputs arrive on."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}

    def add(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        if name in self.grams:
            self.grams[name].addmm_(x.T, x)  # in place: no d x d temporary per micro-batch
        else:
            self.grams[name] = x.T @ x
