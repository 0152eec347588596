"""Loss sensitivity of every projection's output, one block at a time from stored inputs.

For a perturbation ``e`` of a projection's output ``y`` the loss rises by about
``1/2 E[(g . e)^2]``, ``g = dL/dy`` (Fisher); isotropic in the output directions that is
``1/2 (E||g||^2 / d_out) E||e||^2``. So the allocation weighs a matrix's absolute
functional error by ``a = E||g||^2 / d_out`` (per calibration token), ``L`` the summed
next-token loss of every calibration window.

Backpropagation streams like the capture, from the last block down: a block is recomputed
from its stored input with gradients, fed ``dL/dh`` of its output (the top block: from the
final norm, the LM head and the windows' next tokens) and yields ``dL/dh`` of its input for
the block below, while hooks on its projections sum ``||g||^2``. Windows are independent,
so micro-batches give exactly the whole-model gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .capture import micro_batches
from .projections import PROJECTIONS

KwargsFor = Callable[[int, int, int], dict[str, Any]]  # (layer, batch, seq_len) -> kwargs


class Head(nn.Module):
    """Final norm, LM head (and the logit soft-cap where the model has one)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.norm, self.lm_head, self.softcap = norm, lm_head, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each window (the loss ``L``), in float32 at least."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1).to(logits.device),
                                       reduction="sum")


def _hook_projections(block: nn.Module, sums: dict[str, float]) -> list:
    """Forward hooks that register, on each projection's output, a gradient hook adding
    ``||dL/dy||^2`` (float64) to ``sums[projection]``."""
    handles = []
    for projection in PROJECTIONS:
        sums.setdefault(projection, 0.0)

        def on_grad(grad: torch.Tensor, projection: str = projection) -> None:
            sums[projection] += float(grad.detach().to(torch.float64).square().sum())

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor,
                 on_grad: Callable = on_grad) -> None:
            if output.requires_grad:
                output.register_hook(on_grad)
        handles.append(block.get_submodule(projection).register_forward_hook(hook))
    return handles


def block_backward(block: nn.Module, layer: int, kwargs_for: KwargsFor,
                   read_input: Callable[[int, int], torch.Tensor],
                   output_grad: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, float]],
                   write_grad: Callable[[int, torch.Tensor], None], samples: int,
                   micro_batch: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[dict[str, float], float]:
    """Backpropagate through one block over ``samples`` windows in micro-batches.

    ``read_input(lo, hi)``: the block's stored inputs; ``output_grad(lo, hi, out)``:
    ``(dL/d out, loss part)`` for the block's outputs ``out`` (the block above's stored
    gradient, or the head's); ``write_grad(lo, dL/dh)``: where the input gradients go.
    Returns the summed ``||dL/dy||^2`` per projection and the summed loss (0 below the top).
    """
    sums: dict[str, float] = {}
    handles = _hook_projections(block, sums)
    loss = 0.0
    try:
        for lo, hi in micro_batches(samples, micro_batch):
            hidden = read_input(lo, hi).to(device=device, dtype=dtype).requires_grad_(True)
            with torch.enable_grad():
                out = block(hidden, **kwargs_for(layer, hi - lo, hidden.shape[1]))
                grad, part = output_grad(lo, hi, out)
                torch.autograd.backward(out, grad)
            loss += part
            write_grad(lo, hidden.grad.detach())
    finally:
        for handle in handles:
            handle.remove()
    return sums, loss


def head_gradient(head: nn.Module, ids: torch.Tensor) -> Callable:
    """``output_grad`` for the top block: ``dL/dh`` of the last hidden states through the
    head and the next-token loss of the windows ``ids[lo:hi]``."""
    def output_grad(lo: int, hi: int, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        top = out.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = next_token_loss(head(top), ids[lo:hi])
            (grad,) = torch.autograd.grad(loss, top)
        return grad, float(loss.detach())
    return output_grad


def sensitivities(sums: dict[str, float], tokens: int, out_features: dict[str, int]
                  ) -> dict[str, float]:
    """``a = sum ||dL/dy||^2 / tokens / d_out`` per projection."""
    return {p: sums[p] / tokens / out_features[p] for p in sums}
