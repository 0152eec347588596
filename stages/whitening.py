"""Whitening from a calibration Gram: a factor R with R^T R = G (METHOD.md).

``||X (W - W_hat)||_F = ||R (W - W_hat)||_F``, so the solvers work on ``R W`` and map the
dictionary back with ``R^{-1}``. Three paths, tried in order, all in float64:

1. ``cholesky``: G is numerically positive definite (every pivot above the floor below).
2. ``shifted-cholesky``: G + (max(0, -lambda_min) + eps * mean_diag) I. The shift is
   relative to the Gram's own scale (an absolute 1e-6, as in SVD-LLM, is meaningless for
   Grams whose entries run to 1e4 and fails on 13B models).
3. ``eigen``: eigen-decomposition with eigenvalues clamped to that same floor; R is then a
   full (not triangular) matrix with a known inverse.

Never an explicit inverse on the Cholesky paths: un-whitening is a triangular solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RELATIVE_SHIFT = 1e-6


@dataclass
class Whitening:
    factor: torch.Tensor  # R, d x d float64; upper-triangular unless path == "eigen"
    path: str
    shift: float  # added to the diagonal (0.0 on the plain Cholesky path)
    inverse: torch.Tensor | None = None  # R^{-1}, only on the eigen path

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """R W for W of shape d1 x d2."""
        return self.factor @ weight.to(self.factor.dtype)

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        """R^{-1} M, by triangular solve where R is triangular."""
        whitened = whitened.to(self.factor.dtype)
        if self.inverse is not None:
            return self.inverse @ whitened
        return torch.linalg.solve_triangular(self.factor, whitened, upper=True)


class GramError(ValueError):
    pass


def whitening_from_gram(gram: torch.Tensor, relative_shift: float = RELATIVE_SHIFT) -> Whitening:
    """R with R^T R = G. Reads only G's upper triangle (an accumulated Gram can be a hair
    asymmetric; the triangle is an exactly symmetric matrix) and never modifies ``gram``.

    Memory: besides G, one d x d matrix (R) on the plain path; the fallbacks add one more
    (the shifted copy, or the eigenvectors) and LAPACK's workspace. For a 70B down_proj
    (d = 28672) each is 6.6 GB, so no symmetrised, transposed or identity temporaries.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise GramError(f"Gram must be square, got shape {tuple(gram.shape)}")
    gram = gram.to(torch.float64)
    if not torch.isfinite(gram).all():
        raise GramError("Gram holds NaN or Inf values")
    scale = gram.diagonal().mean().item()
    if scale <= 0.0:
        raise GramError("Gram is zero: the layer saw no (non-zero) calibration inputs")

    floor = relative_shift * scale
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if _well_posed(factor, info, floor):
        return Whitening(factor, "cholesky", 0.0)
    del factor

    lambda_min = torch.linalg.eigvalsh(gram, UPLO="U")[0].item()
    shift = max(0.0, -lambda_min) + floor
    shifted = gram.clone()
    shifted.diagonal().add_(shift)
    factor, info = torch.linalg.cholesky_ex(shifted, upper=True)
    del shifted
    if _well_posed(factor, info, floor / 2):
        return Whitening(factor, "shifted-cholesky", shift)
    del factor

    eigenvalues, eigenvectors = torch.linalg.eigh(gram, UPLO="U")
    root = eigenvalues.clamp_min(floor).sqrt()
    factor = root[:, None] * eigenvectors.mT
    inverse = eigenvectors.div_(root[None, :])
    return Whitening(factor, "eigen", floor, inverse)


def _well_posed(factor: torch.Tensor, info: torch.Tensor, floor: float) -> bool:
    """A Cholesky that 'succeeds' on an exactly singular Gram (rounding leaves a pivot of
    ~1e-8) would make un-whitening blow up by 1e8: demand every pivot above the floor."""
    if info.item() != 0:
        return False
    return bool((factor.diagonal().square() >= floor).all())
