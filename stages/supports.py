"""Support selection: which s atoms each output column keeps (pure functions over tensors).

A rule maps ``gains`` (k x d2, non-negative: what keeping atom i in column j is worth; for
an orthonormal dictionary it is exactly the squared correlation ``(D^T W)_ij^2``) and the
per-column budget ``s`` to an ``s x d2`` int64 support (distinct atoms per column, in any
order: the solver sorts once at the end). With
an orthonormal dictionary the best code on any support is the correlations restricted to
it, so a rule that maximises the kept gain under its structure gives the best structured
code (METHOD.md, closed-form steps). Structured rules (2:4, blocks of columns sharing a
support) plug in here under a new name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SupportRule = Callable[[torch.Tensor, int], torch.Tensor]


def top_s(gains: torch.Tensor, s: int) -> torch.Tensor:
    """The s atoms of largest gain in every column (unstructured: CoSpaDi's format)."""
    k = gains.shape[0]
    if not 1 <= s <= k:
        raise ValueError(f"support size s must lie in [1, {k}], got {s}")
    # along contiguous rows of the transpose: ~2x faster than down strided columns
    return gains.T.contiguous().topk(s, dim=1, sorted=False).indices.T


SUPPORT_RULES: dict[str, SupportRule] = {"top-s": top_s}


def support_rule(name: str) -> SupportRule:
    try:
        return SUPPORT_RULES[name]
    except KeyError:
        raise ValueError(f"unknown support rule {name!r}; known: "
                         f"{', '.join(sorted(SUPPORT_RULES))}") from None
