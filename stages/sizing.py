"""How many atoms, non-zeros or singular vectors a matrix keeps at a compression ratio.

Conventions follow METHOD.md: a layer computes ``Y = X W`` with ``W`` of shape ``d1 x d2``
(in x out). CoSpaDi keeps a dense ``d1 x k`` dictionary and ``s`` coefficients per output
column; the on-disk form stores the dictionary in bf16, the coefficients in 14 bits and the
support as a ``k x d2`` bit-mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DENSE_BYTES_PER_PARAM = 2  # bf16 reference checkpoint
DICTIONARY_BITS = 16  # bf16
COEFFICIENT_BITS = 14  # bf16 with the two lowest mantissa bits dropped
MASK_BITS = 1  # one bit per (atom, column) pair


class _KeptFractions:
    """Kept fractions against the dense d1 x d2 matrix in bf16."""

    d1: int
    d2: int
    params: int
    bytes: int

    @property
    def kept_params(self) -> float:
        return self.params / (self.d1 * self.d2)

    @property
    def kept_bytes(self) -> float:
        return self.bytes / (DENSE_BYTES_PER_PARAM * self.d1 * self.d2)


@dataclass(frozen=True)
class DictionaryShape(_KeptFractions):
    d1: int
    d2: int
    k: int  # atoms
    s: int  # non-zeros per column
    support: str = "free"  # see stages/supports.py

    @property
    def params(self) -> int:
        return self.d1 * self.k + self.s * self.d2

    @property
    def bytes(self) -> int:
        return dictionary_bytes(self.d1, self.d2, self.k, self.s, self.support)


@dataclass(frozen=True)
class LowRankShape(_KeptFractions):
    d1: int
    d2: int
    r: int

    @property
    def params(self) -> int:
        return self.r * (self.d1 + self.d2)

    @property
    def bytes(self) -> int:
        return DENSE_BYTES_PER_PARAM * self.params


def check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise ValueError(f"compression ratio must lie in (0, 1), got {ratio}")


def dictionary_bytes(d1: int, d2: int, k: int, s: int, support: str = "free") -> int:
    """Exact bytes of the on-disk form: bf16 dictionary, 14-bit values, k x d2 bit-mask
    (``free`` and ``2:4`` supports); for ``block<B>`` supports bf16 values and one int16
    atom index per (block, non-zero)."""
    dictionary = d1 * k * DICTIONARY_BITS // 8
    if support.startswith("block"):
        blocks = d2 // int(support[len("block"):])
        return dictionary + 2 * s * d2 + 2 * blocks * s
    values = math.ceil(s * d2 * COEFFICIENT_BITS / 8)
    mask = math.ceil(k * d2 * MASK_BITS / 8)
    return dictionary + values + mask


def dictionary_shape(d1: int, d2: int, ratio: float, rho: float,
                     support: str = "free") -> DictionaryShape:
    """k and s so that ``d1 k + s d2`` is within one atom of ``(1 - ratio) d1 d2``.

    k comes from METHOD.md's closed form; s is then re-solved from the budget left after
    the dictionary, so rounding k costs at most one atom and rounding s half a column.
    A ``2:4`` support needs rho = 2 and k a multiple of 4: k is rounded down to one and
    s = k / 2 (at most 4 atoms under the budget).
    """
    check_ratio(ratio)
    if not rho >= 1.0:
        raise ValueError(f"rho = k / s must be >= 1, got {rho}")
    if d1 < 1 or d2 < 1:
        raise ValueError(f"matrix shape must be positive, got {d1} x {d2}")
    budget = (1.0 - ratio) * d1 * d2
    k = max(1, round(budget / (d1 + d2 / rho)))
    if support == "2:4":
        if rho != 2.0:
            raise ValueError(f"support 2:4 keeps exactly half the atoms: rho must be 2, got {rho}")
        k = max(4, int(budget / (d1 + d2 / 2)) // 4 * 4)
        return DictionaryShape(d1=d1, d2=d2, k=k, s=k // 2, support=support)
    s = round((budget - d1 * k) / d2)
    # s atoms must be linearly independent for OMP: never more than d1 or k.
    s = int(min(max(s, 1), k, d1))
    return DictionaryShape(d1=d1, d2=d2, k=int(k), s=s, support=support)


def svd_rank(d1: int, d2: int, ratio: float) -> LowRankShape:
    """SVD-LLM's rank ``floor((1 - ratio) d1 d2 / (d1 + d2))``."""
    check_ratio(ratio)
    r = math.floor((1.0 - ratio) * d1 * d2 / (d1 + d2))
    r = max(1, min(r, d1, d2))
    return LowRankShape(d1=d1, d2=d2, r=r)
