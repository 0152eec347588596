"""The factors a compressed projection is made of (math layout: W is d1 x d2 = in x out)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DictionaryFactors:
    """``W_hat = dictionary @ S`` with S column-sparse: column j holds ``values[:, j]`` at
    rows ``support[:, j]`` (ascending, exactly s distinct atoms per column)."""

    dictionary: torch.Tensor  # d1 x k, float32
    support: torch.Tensor  # s x d2, int64, ascending within each column
    values: torch.Tensor  # s x d2, float32
    structure: str = "free"  # support structure, see stages/supports.py

    @property
    def shape(self) -> tuple[int, int]:
        return self.dictionary.shape[0], self.support.shape[1]

    @property
    def k(self) -> int:
        return self.dictionary.shape[1]

    @property
    def s(self) -> int:
        return self.support.shape[0]

    def codes_dense(self) -> torch.Tensor:
        """The k x d2 coefficient matrix S."""
        codes = torch.zeros(self.k, self.support.shape[1], dtype=self.values.dtype,
                            device=self.values.device)
        return codes.scatter_(0, self.support, self.values)

    def dense(self) -> torch.Tensor:
        """The d1 x d2 reconstruction D S."""
        return self.dictionary.to(self.values.dtype) @ self.codes_dense()

    def column_slice(self, start: int, stop: int) -> DictionaryFactors:
        """Factors of columns [start, stop): the per-layer part of a shared group solve."""
        return DictionaryFactors(self.dictionary, self.support[:, start:stop].contiguous(),
                                 self.values[:, start:stop].contiguous(), self.structure)


@dataclass
class LowRankFactors:
    """``W_hat = left @ right`` (SVD-LLM: U_r Sigma^1/2 and Sigma^1/2 V_r^T, un-whitened)."""

    left: torch.Tensor  # d1 x r
    right: torch.Tensor  # r x d2

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def r(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def column_slice(self, start: int, stop: int) -> LowRankFactors:
        return LowRankFactors(self.left, self.right[:, start:stop].contiguous())


@dataclass
class MasaFactors:
    """``W_hat = sum_s coefficients[s] atoms[s] + left @ right`` (MASA): the atoms are shared
    by the members of a group (the same tensor object), the rest is the member's own."""

    atoms: torch.Tensor  # S x d1 x d2, float32 (shared)
    coefficients: torch.Tensor  # S, float32
    left: torch.Tensor  # d1 x r
    right: torch.Tensor  # r x d2

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def s(self) -> int:
        return self.atoms.shape[0]

    @property
    def r(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        shared = torch.tensordot(self.coefficients.to(self.atoms.dtype), self.atoms, dims=1)
        return shared.to(self.left.dtype) + self.left @ self.right


Factors = DictionaryFactors | LowRankFactors | MasaFactors


@dataclass
class DictionarySolution:
    """What a dictionary solver returns: ``whitened ~ dictionary @ S`` in whitened space."""

    dictionary: torch.Tensor  # d1 x k
    support: torch.Tensor  # s x d2 int64, ascending within each column
    values: torch.Tensor  # s x d2
    stats: dict = field(default_factory=dict)  # "error" (relative, whitened) and more
