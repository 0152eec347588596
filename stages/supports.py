"""Support structures of the codes S (k x d2) and their exact selectors.

A support structure says which (atom, column) pairs may be non-zero:

- ``free``: any s atoms per column (the paper's; stored as a bit-mask + 14-bit values);
- ``2:4``: of every 4 consecutive atoms a column uses exactly 2 (s = k / 2): S^T then has
  the layout of semi-structured sparse GEMM (cuSPARSELt / CUTLASS); stored like ``free``;
- ``block<B>`` (e.g. ``block64``): the output columns form blocks of B consecutive columns
  and all columns of a block use the same s atoms; ``y_block = z[atoms] @ V_block`` is one
  small dense matmul per block (batched over blocks), the index is tiny (s per block).

Selectors are pure functions ``scores (k x d2) -> bool mask (k x d2)``. With an
orthonormal dictionary U (whitened space) and ``scores = U^T W_L`` the reconstruction error
of any support is ``||W_L||^2 - sum of kept scores^2``, so each selector below is the exact
best code under its structure: top s by |score| per column, top 2 of each group of 4, or per
block the s atoms with the largest energy summed over the block's columns.

The closed solver takes its free-support rule as a ``SupportRule``: ``gains`` (k x d2,
non-negative: what keeping atom i in column j is worth; for an orthonormal dictionary exactly
the squared correlation) and ``s`` to an ``s x d2`` int64 support (``top_s``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

FREE = "free"
TWO_FOUR = "2:4"
_BLOCK = re.compile(r"block(\d+)$")


@dataclass(frozen=True)
class Support:
    kind: str  # "free" | "2:4" | "block"
    block: int = 0  # columns per block (kind "block")

    @property
    def name(self) -> str:
        return f"block{self.block}" if self.kind == "block" else self.kind

    @property
    def structured(self) -> bool:
        return self.kind != FREE


def parse_support(text: str) -> Support:
    """``free``, ``2:4`` or ``block<B>`` (B >= 1); anything else is a ValueError."""
    if text in (FREE, TWO_FOUR):
        return Support(text)
    match = _BLOCK.match(text)
    if match and int(match.group(1)) >= 1:
        return Support("block", int(match.group(1)))
    raise ValueError(f"support must be 'free', '2:4' or 'block<B>' (e.g. block64), got {text!r}")


def check_shape(support: Support, k: int, d2: int, s: int) -> None:
    """The structure's constraints on the shape (the message names the setting)."""
    if support.kind == TWO_FOUR and (k % 4 or s * 2 != k):
        raise ValueError(f"support 2:4 needs k a multiple of 4 and s = k / 2, got k={k}, s={s}")
    if support.kind == "block" and d2 % support.block:
        raise ValueError(f"support {support.name}: the output width {d2} is not a multiple "
                         f"of the block size {support.block}")
    if not 1 <= s <= k:
        raise ValueError(f"s must lie in [1, k={k}], got {s}")


def select_free(scores: torch.Tensor, s: int) -> torch.Tensor:
    """Top-s atoms by |score| in each column."""
    top = scores.abs().topk(s, dim=0).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, top, True)


def select_two_four(scores: torch.Tensor) -> torch.Tensor:
    """Top 2 by |score| in each group of 4 consecutive atoms of each column."""
    k, d2 = scores.shape
    if k % 4:
        raise ValueError(f"2:4 supports need k a multiple of 4, got k={k}")
    groups = scores.abs().reshape(k // 4, 4, d2)
    top = groups.topk(2, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).reshape(k, d2)


def select_blocks(scores: torch.Tensor, s: int, block: int) -> torch.Tensor:
    """Per block of ``block`` consecutive columns, the s atoms of largest summed energy."""
    k, d2 = scores.shape
    if d2 % block:
        raise ValueError(f"output width {d2} is not a multiple of the block size {block}")
    energy = scores.square().reshape(k, d2 // block, block).sum(dim=2)  # k x blocks
    top = energy.topk(s, dim=0).indices
    chosen = torch.zeros_like(energy, dtype=torch.bool).scatter_(0, top, True)
    return chosen.repeat_interleave(block, dim=1)


def select(scores: torch.Tensor, s: int, support: Support) -> torch.Tensor:
    """Bool k x d2 mask with s atoms per column honouring ``support``."""
    if support.kind == FREE:
        return select_free(scores, s)
    if support.kind == TWO_FOUR:
        if scores.shape[0] != 2 * s:
            raise ValueError(f"2:4 supports need s = k / 2, got k={scores.shape[0]}, s={s}")
        return select_two_four(scores)
    return select_blocks(scores, s, support.block)


def atom_order(k: int, support: Support) -> torch.Tensor:
    """The order to give atoms sorted by importance (singular value) before selecting.

    Atom order is free, and it matters only for 2:4: in singular-value order the 4 leading
    atoms share a group and every column would lose 2 of them. Interleaving the quarters
    (group g = atoms g, g + k/4, g + k/2, g + 3k/4 of the sorted order) puts atoms of
    unlike importance together. Identity for the other structures."""
    if support.kind != TWO_FOUR:
        return torch.arange(k)
    whole = 4 * (k // 4)  # a warm start of k > m atoms has m, maybe not a multiple of 4
    return torch.cat([torch.arange(whole).reshape(4, k // 4).T.reshape(-1),
                      torch.arange(whole, k)])


def as_rule(support: Support):
    """``support``'s selector as a rule ``(gains k x d2, s) -> support s x d2`` (atoms
    ascending), gains being squared correlations: the form the closed-form solver's
    pluggable support step takes (ranking by gain = ranking by |score|). For 2:4 the
    solver must also order its atoms by :func:`atom_order` before selecting."""
    def rule(gains: torch.Tensor, s: int) -> torch.Tensor:
        mask = select(gains.clamp_min(0).sqrt(), s, support)  # |scores|, same ranking
        return mask.T.nonzero()[:, 1].reshape(gains.shape[1], s).T.contiguous()
    return rule


def honours(support_idx: torch.Tensor, k: int, support: Support) -> bool:
    """Whether a support (s x d2, atoms ascending) has ``support``'s structure."""
    if support.kind == FREE:
        return True
    if support.kind == TWO_FOUR:
        mask = torch.zeros(k, support_idx.shape[1], dtype=torch.bool,
                           device=support_idx.device)
        return is_two_four(mask.scatter_(0, support_idx, True))
    s, d2 = support_idx.shape
    blocks = support_idx.reshape(s, d2 // support.block, support.block)
    return bool((blocks == blocks[:, :, :1]).all())


def is_two_four(mask: torch.Tensor) -> bool:
    """Every group of 4 consecutive atoms holds exactly 2 set entries in every column."""
    k, d2 = mask.shape
    return k % 4 == 0 and bool((mask.reshape(k // 4, 4, d2).sum(dim=1) == 2).all())


def support_and_values(mask: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """``(support, values)``, s x d2 each (atoms ascending), of the masked codes."""
    k, d2 = mask.shape
    s = int(mask[:, 0].sum()) if d2 else 0
    if d2 and not (mask.sum(dim=0) == s).all():
        raise ValueError("mask must set the same number of atoms in every column")
    # nonzero() on the transposed mask walks column by column, atoms ascending.
    support = mask.T.nonzero()[:, 1].reshape(d2, s).T.contiguous()
    return support, codes.gather(0, support)


def orthonormal_codes(whitened: torch.Tensor, k: int, s: int, support: Support
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact coder for an orthonormal dictionary: U = top-k left singular vectors of
    the whitened weight, codes = the structured top selection of ``U^T W_L``.

    Returns ``(U d1 x k, support s x d2, values s x d2)`` in the input's dtype.
    """
    d1, d2 = whitened.shape
    if k > min(d1, d2):
        raise ValueError(f"an orthonormal dictionary has at most min(d1, d2) = "
                         f"{min(d1, d2)} atoms, asked for {k}")
    check_shape(support, k, d2, s)
    u = torch.linalg.svd(whitened, full_matrices=False)[0][:, :k]
    u = u[:, atom_order(k, support).to(u.device)]
    scores = u.T @ whitened
    support_idx, values = support_and_values(select(scores, s, support), scores)
    return u, support_idx, values


SupportRule = Callable[[torch.Tensor, int], torch.Tensor]


def top_s(gains: torch.Tensor, s: int) -> torch.Tensor:
    """The s atoms of largest gain in every column (unstructured: CoSpaDi's format)."""
    k = gains.shape[0]
    if not 1 <= s <= k:
        raise ValueError(f"support size s must lie in [1, {k}], got {s}")
    # along contiguous rows of the transpose: ~2x faster than down strided columns
    return gains.T.contiguous().topk(s, dim=1, sorted=False).indices.T
