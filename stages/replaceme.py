"""ReplaceMe depth pruning (arXiv 2505.02819, METHOD.md): pure functions over tensors.

A window of ``n`` consecutive blocks ``[l, l + n)`` is removed and replaced by a linear map
``T`` folded into the block before it, ``i = l - 1``:

- *selection*: the window whose input ``h_l`` and output ``h_{l+n}`` are closest, mean
  angular distance ``arccos(cos(h_l, h_{l+n})) / pi`` over calibration tokens (smallest
  wins, ties to the earlier window; never a window starting at block 0, which has no block
  before it to fold into);
- *fit*: with ``M`` the MLP output of block ``i`` and ``B = h_{l+n} - h_l + M``, ridge least
  squares ``T = argmin ||M T - B||^2 + lambda ||T||^2`` from the float64 sums ``M^T M`` and
  ``M^T B`` (a relative ``lambda``; Cholesky or its fallbacks, never an inverse);
- *cosine fit* (``--prune-fit cosine``): ``T`` minimising the mean cosine distance between
  ``M T + h_l - M`` and ``h_{l+n}``, by Adam over stored rows from ``T = I`` (dropping the
  window). Least squares is dominated by the few tokens of huge norm (attention sinks) and
  over a long window lands on a map worse than dropping; the cosine weights every token
  alike, as the next block's norm does;
- *fold*: ``down_proj`` computes ``y = x W^T + b``; ``y T`` is ``x (T^T W)^T + T^T b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .capture import micro_batches
from .whitening import whitening_from_gram

PRUNE_SECTION = "cospadi_prune"  # config.json section of a pruned checkpoint
RIDGE = 1e-6  # lambda relative to mean(diag M^T M): conditioning only, as for whitening
# cosine fit (Adam from T = I, i.e. from dropping the window): settings of the SmolLM2 study
# (tools/replaceme_fit_study.py), where 10 epochs at 1e-3 took N = 8 from ppl 142 (drop) /
# 133 (lstsq) to 113; the loss was still falling, so this is a budget, not convergence
COSINE_EPOCHS = 10
COSINE_LR = 1e-3
COSINE_ROWS = 1024  # token rows per Adam step
MLP = "mlp"  # the module whose output is added to the residual stream
DOWN_PROJ = "mlp.down_proj"
POST_MLP_NORMS = ("post_feedforward_layernorm",)  # Gemma 2/3: MLP output normalised first


class PruneError(ValueError):
    """A pruning setting or model the method cannot handle (the message names it)."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``... x d`` as rows, in float32 at least (half-precision sums are too coarse)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every token row of ``x`` (float64 result)."""
    return torch.linalg.vector_norm(_rows(x), dim=1).to(torch.float64)


def angular_distance_sum(a: torch.Tensor, b: torch.Tensor,
                         b_norms: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum over tokens of ``arccos(cos(a, b)) / pi`` and the token count.

    ``a`` and ``b``: ``... x d`` hidden states of the same tokens; ``b_norms``: ``b``'s
    :func:`row_norms` when already known (a scan compares one output with N inputs). Dot
    products and norms are summed in the inputs' precision (float32 at least: no float64
    copy of the states, which cost a prune-only run more than its block forwards), the
    angle in float64. A zero vector has no direction; its cosine counts as 0 (distance
    1/2) rather than NaN.
    """
    a, b = _rows(a), _rows(b)
    if a.dtype != b.dtype:
        a, b = a.to(torch.float64), b.to(torch.float64)
    dots = torch.einsum("ij,ij->i", a, b).to(torch.float64)  # row dots, no product copy
    norms = row_norms(a) * (row_norms(b) if b_norms is None else b_norms)
    cos = dots / norms.clamp_min(torch.finfo(torch.float64).tiny)
    angle = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    return float(angle.sum()), int(a.shape[0])


def candidate_starts(depth: int, size: int) -> range:
    """Window starts ``l`` with a block before them and the window inside the model."""
    return range(1, depth - size + 1)


def check_prune(depth: int, size: int) -> None:
    if size < 1:
        raise PruneError(f"prune-blocks must be >= 1, got {size}")
    if size > depth - 1:
        raise PruneError(f"prune-blocks {size} leaves no block before the window: the model "
                         f"has {depth} blocks, a window never starts at block 0, so at most "
                         f"{depth - 1} can be removed")


def choose_window(distances: dict[int, float]) -> int:
    """The start of the closest window (``{start: mean distance}``); ties to the earliest."""
    if not distances:
        raise PruneError("no candidate window to prune")
    return min(sorted(distances), key=lambda start: distances[start])


def has_post_mlp_norm(block: nn.Module) -> bool:
    return any(isinstance(getattr(block, name, None), nn.Module) for name in POST_MLP_NORMS)


class FitAccumulator:
    """float64 running sums ``M^T M`` and ``M^T B`` over token rows."""

    def __init__(self) -> None:
        self.mtm: torch.Tensor | None = None
        self.mtb: torch.Tensor | None = None
        self.tokens = 0

    def add(self, mlp_out: torch.Tensor, window_in: torch.Tensor,
            window_out: torch.Tensor) -> None:
        """One batch: M (MLP output of block l - 1), h_l and h_{l+n}, all ``... x d``."""
        d = mlp_out.shape[-1]
        m = mlp_out.reshape(-1, d).to(torch.float64)
        b = window_out.reshape(-1, d).to(torch.float64) - \
            window_in.reshape(-1, d).to(torch.float64) + m
        if self.mtm is None:
            self.mtm = torch.zeros(d, d, dtype=torch.float64, device=m.device)
            self.mtb = torch.zeros(d, d, dtype=torch.float64, device=m.device)
        self.mtm.addmm_(m.T, m)
        self.mtb.addmm_(m.T, b)
        self.tokens += m.shape[0]


@dataclass
class Transform:
    matrix: torch.Tensor  # T, d x d float64: row vectors map as h -> h T
    path: str  # the solve's path (cholesky, shifted-cholesky, eigen)
    ridge: float  # lambda actually added (absolute)


def solve_transform(mtm: torch.Tensor, mtb: torch.Tensor,
                    relative_ridge: float = RIDGE) -> Transform:
    """``(M^T M + lambda I)^{-1} M^T B`` by two triangular solves (whitening's fallbacks)."""
    mtm = mtm.to(torch.float64)
    scale = mtm.diagonal().mean().item()
    ridge = relative_ridge * scale
    gram = mtm.clone()
    gram.diagonal().add_(ridge)
    # ridge added above, so the whitening's own floor is far below it: 1e-3 of it
    white = whitening_from_gram(gram, relative_shift=relative_ridge * 1e-3)
    rhs = mtb.to(torch.float64)
    if white.inverse is not None:  # eigen path: R^{-T} = (R^{-1})^T
        half = white.inverse.mT @ rhs
    else:
        half = torch.linalg.solve_triangular(white.factor.mT, rhs, upper=False)
    matrix = white.unwhiten(half)
    return Transform(matrix, white.path, ridge + white.shift)


def fold_down_proj(weight: torch.Tensor, bias: torch.Tensor | None, transform: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``down_proj`` (torch layout, out x in) and its bias after ``y -> y T``, in float64."""
    t = transform.to(torch.float64)
    folded = t.T @ weight.to(torch.float64)
    return folded, (None if bias is None else t.T @ bias.to(torch.float64))


def kept_layers(depth: int, start: int, size: int) -> list[int]:
    """Original indices of the blocks a pruned model keeps, in order."""
    return [i for i in range(depth) if not start <= i < start + size]


def cosine_loss(mlp_out: torch.Tensor, rest: torch.Tensor, target: torch.Tensor,
                transform: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - cos(M T + rest, target)``, ``rest = h_l - M`` (ReplaceMe's
    cosine variant: only directions matter, the next block's norm removes the scale)."""
    pred = mlp_out.to(transform.dtype) @ transform + rest.to(transform.dtype)
    return (1 - torch.nn.functional.cosine_similarity(pred, target.to(transform.dtype),
                                                      dim=-1)).mean()


def cosine_fit_epoch(transform: torch.Tensor, optimizer: torch.optim.Optimizer,
                     batches) -> float:
    """One pass of ``optimizer`` (over ``transform``) through ``(M, rest, target)`` row
    batches (streamed: one batch in memory); returns the row-weighted mean loss seen."""
    total, rows = 0.0, 0
    for mlp_out, rest, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = cosine_loss(mlp_out, rest, target, transform)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * mlp_out.shape[0]
        rows += mlp_out.shape[0]
    return total / max(rows, 1)


def fit_cosine(dim: int, epoch_batches: Callable[[int], Iterable[tuple]],
               device: torch.device | str = "cpu", epochs: int = COSINE_EPOCHS,
               lr: float = COSINE_LR) -> tuple[torch.Tensor, list[float]]:
    """T (float64) by Adam on the cosine loss from ``T = I``; ``epoch_batches(e)`` yields
    epoch ``e``'s ``(M, rest, target)`` row batches. Also returns the loss per epoch."""
    transform = torch.eye(dim, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([transform], lr=lr)
    with torch.enable_grad():
        losses = [cosine_fit_epoch(transform, optimizer, epoch_batches(e))
                  for e in range(epochs)]
    return transform.detach().to(torch.float64), losses


def cosine_batches(read: Callable[[int, int], tuple[torch.Tensor, ...]], samples: int,
                   micro_batch: int, seed: int, epoch: int, rows: int = COSINE_ROWS):
    """Epoch ``epoch``'s row batches: micro-batches of samples in a seeded order, token rows
    shuffled within each, ``rows`` per batch. ``read(lo, hi)`` returns the ``(M, rest,
    target)`` rows of samples ``lo:hi`` (streamed: one micro-batch in memory at a time)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    chunks = micro_batches(samples, micro_batch)
    for k in torch.randperm(len(chunks), generator=generator).tolist():
        tensors = read(*chunks[k])
        for index in torch.randperm(tensors[0].shape[0], generator=generator).split(rows):
            yield tuple(t[index] for t in tensors)
