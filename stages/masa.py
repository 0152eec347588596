"""MASA, training-free (arXiv 2508.04581, METHOD.md): matrix atoms shared across layers.

For one projection type and a group of m layers (weights ``W_l``, d1 x d2, math layout):

1. Stack ``vec(W_l)`` as the rows of an m x (d1 d2) matrix and keep its top-S principal
   directions (uncentred, through the m x m Gram of the stack) as S shared matrix atoms
   ``A_s`` with orthonormal vectorisations; member l keeps its S coefficients
   ``c_ls = <W_l, A_s>``.
2. Each member's residual ``E_l = W_l - sum_s c_ls A_s`` gets a whitened low-rank
   correction (its own calibration Gram, as SVD-LLM): the SVD of ``R_l E_l`` truncated and
   un-whitened by ``R_l^{-1}``.
3. The group's correction rank is fixed by the budget (``masa_shape``); it is spread over
   the members where it lowers the summed relative functional error
   ``||R_l (W_l - W_hat_l)||^2 / ||R_l W_l||^2`` most. Each member's error is the tail sum
   of its sorted squared singular values, so taking the largest normalised values across
   members (a global top-R) is the exact optimum for that total.

Budget (kept parameters of the group, ``(1 - ratio) m d1 d2``): ``S d1 d2`` atoms + ``m S``
coefficients + ``R (d1 + d2)`` correction parameters, R the largest total rank that fits.

4. S itself (``--masa-atoms auto``, the default): per group and projection, the S in
   0 .. m - 1 whose solve has the smallest summed relative error at that same budget. On a
   model whose layers share no structure an atom is one member's own weight and only moves
   budget between members; S = 0 (the group's rank spread over its members) refuses that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .compress_block import GroupFactors
from .factors import MasaFactors
from .projections import INPUT_OF
from .sizing import DENSE_BYTES_PER_PARAM, check_ratio, svd_rank

COEFFICIENT_BYTES = 4  # float32 coefficients (m S numbers per group: negligible)
_DEGENERATE = 1e-12  # principal values below this fraction of the largest are dropped


class MasaError(ValueError):
    """Atoms or ranks that cannot fit the budget (the message names the setting)."""


@dataclass(frozen=True)
class MasaShape:
    d1: int
    d2: int
    members: int  # m
    atoms: int  # S
    rank: int  # R: correction rank summed over the members

    @property
    def params(self) -> int:
        return (self.atoms * self.d1 * self.d2 + self.members * self.atoms
                + self.rank * (self.d1 + self.d2))

    @property
    def bytes(self) -> int:
        return (DENSE_BYTES_PER_PARAM * (self.atoms * self.d1 * self.d2
                                         + self.rank * (self.d1 + self.d2))
                + COEFFICIENT_BYTES * self.members * self.atoms)


def group_atoms(members: int, atoms: int) -> int:
    """S for a group of ``members``: the setting, lowered to m - 1 for a short last group
    (a group of one keeps no atom: it is plain whitened SVD)."""
    return min(atoms, members - 1)


def masa_shape(d1: int, d2: int, members: int, ratio: float, atoms: int) -> MasaShape:
    """S atoms and the largest total correction rank within ``(1 - ratio) m d1 d2``."""
    check_ratio(ratio)
    if members < 1 or atoms < 0:
        raise MasaError(f"need members >= 1 and atoms >= 0, got {members} and {atoms}")
    if atoms >= members and members > 1:
        raise MasaError(f"masa-atoms S = {atoms} must be below the group size m = {members}")
    budget = (1.0 - ratio) * members * d1 * d2
    left = budget - atoms * (d1 * d2 + members)
    if left < 0:
        raise MasaError(f"masa-atoms S = {atoms} of {d1} x {d2} does not fit a group of "
                        f"{members} at ratio {ratio}: the atoms alone keep "
                        f"{atoms / members:.3f} of the parameters, the budget is "
                        f"{1 - ratio:.3f}; lower masa-atoms or the ratio")
    rank = min(math.floor(left / (d1 + d2)), members * min(d1, d2))
    return MasaShape(d1, d2, members, atoms, rank)


def matrix_atoms(weights: Sequence[torch.Tensor], atoms: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-S principal matrix atoms of the stacked members (float64).

    Returns atoms (S x d1 x d2, orthonormal as vectors) and coefficients (m x S). Computed
    through the m x m Gram of the stack, so no (d1 d2)^2 matrix. Each atom's sign makes its
    largest-magnitude coefficient positive (deterministic); directions with a vanishing
    principal value (a stack of rank < S) become zero atoms with zero coefficients.
    """
    shape = weights[0].shape
    stack = torch.stack([w.to(torch.float64).reshape(-1) for w in weights])  # m x D
    if atoms == 0:
        return stack.new_zeros((0, *shape)), stack.new_zeros((len(weights), 0))
    gram = stack @ stack.T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0)[:atoms], vectors.flip(1)[:, :atoms]
    keep = values > _DEGENERATE * max(values[0].item(), 0.0)
    roots = values.clamp_min(0.0).sqrt()
    coefficients = vectors * roots  # m x S: c_ls = <W_l, A_s>
    pivot = coefficients.abs().argmax(dim=0)
    signs = torch.sign(coefficients[pivot, torch.arange(atoms)])
    signs[signs == 0] = 1.0
    coefficients = coefficients * signs * keep
    basis = (vectors * signs * keep / torch.where(keep, roots, 1.0)).T @ stack  # S x D
    return basis.reshape(atoms, *shape), coefficients


def allocate_ranks(spectra: Sequence[torch.Tensor], total: int) -> list[int]:
    """Ranks per member maximising the removed normalised energy for a total rank.

    ``spectra[l]``: member l's singular values squared over its normalisation, descending.
    The largest ``total`` values across members win (ties: lower member first).
    """
    capacity = sum(len(s) for s in spectra)
    if total > capacity:
        raise MasaError(f"correction rank {total} exceeds what the members can take "
                        f"({capacity})")
    if total == 0:
        return [0] * len(spectra)
    values = torch.cat([s.to(torch.float64) for s in spectra])
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(spectra)])
    order = torch.sort(values, descending=True, stable=True).indices[:total]
    counts = torch.bincount(owner[order], minlength=len(spectra))
    return [int(c) for c in counts]


@dataclass
class MasaResult:
    factors: list[MasaFactors]
    ranks: list[int]
    whitening_paths: list[str]
    relative_errors: list[float]  # ||R_l (W_l - W_hat_l)||^2 / ||R_l W_l||^2 per member
    svd_llm_errors: list[float] = field(default_factory=list)  # same, SVD-LLM at svd_rank


def masa_group(weights: Sequence[torch.Tensor], whitenings: Sequence[object],
               shape: MasaShape, svd_rank: int | None = None) -> MasaResult:
    """Shared atoms, coefficients and whitened low-rank corrections of one group.

    ``whitenings[l]`` whitens member l's input (its own Gram): ``whiten``/``unwhiten`` of
    stages.whitening.Whitening. Computed in float64; factors returned in float32.
    ``svd_rank``: also report each member's SVD-LLM error at that rank (diagnostics).
    """
    members = len(weights)
    if members != shape.members or len(whitenings) != members:
        raise ValueError(f"{members} weights, {len(whitenings)} whitenings for a group of "
                         f"{shape.members}")
    for w in weights:
        if tuple(w.shape) != (shape.d1, shape.d2):
            raise ValueError(f"member shape {tuple(w.shape)} != {(shape.d1, shape.d2)}")
        if not torch.isfinite(w).all():
            raise ValueError("weight matrix holds NaN or Inf values")
    device = whitenings[0].factor.device
    weights = [w.to(device=device, dtype=torch.float64) for w in weights]
    atoms, coefficients = matrix_atoms(weights, shape.atoms)
    svds, spectra, norms, reference = [], [], [], []
    for w, c, whitening in zip(weights, coefficients, whitenings, strict=True):
        residual = w - torch.tensordot(c, atoms, dims=1) if shape.atoms else w
        whitened = whitening.whiten(residual)
        if svd_rank is None:
            norm = whitening.whiten(w).square().sum().item()
        else:
            energy = torch.linalg.svdvals(whitening.whiten(w)).square()
            norm = energy.sum().item()
            reference.append(energy[svd_rank:].sum().item() / norm if norm > 0 else 0.0)
        u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
        svds.append((u, sigma, vh))
        norms.append(norm if norm > 0 else 1.0)
        spectra.append(sigma.square() / norms[-1])
    ranks = allocate_ranks(spectra, shape.rank)
    factors, errors = [], []
    shared = atoms.float().cpu()
    for member, (u, sigma, vh) in enumerate(svds):
        r = ranks[member]
        root = sigma[:r].sqrt()
        left = whitenings[member].unwhiten(u[:, :r] * root)
        right = root[:, None] * vh[:r]
        errors.append(float(spectra[member][r:].sum()))
        factors.append(MasaFactors(shared, coefficients[member].float().cpu(),
                                   left.float().cpu(), right.float().cpu()))
    return MasaResult(factors, ranks, [w.path for w in whitenings], errors, reference)


def best_atoms_group(weights: Sequence[torch.Tensor], whitenings: Sequence[object],
                     ratio: float, candidates: Sequence[int], svd_rank: int | None = None
                     ) -> tuple[MasaShape, MasaResult, dict[int, float]]:
    """MASA with the S among ``candidates`` whose group error is smallest at the same budget.

    Every candidate meets ``(1 - ratio) m d1 d2`` (``masa_shape``), so they compare at equal
    bytes (within one rank unit); the criterion is the rank allocation's own objective, the
    summed relative functional error of the members. S = 0 is the group's rank spread over
    its members without atoms: where the layers share no structure an atom is one member's
    own weight and only moves budget between members, which this choice can refuse.
    Returns the chosen shape, its result and the error of every candidate that fits.
    """
    d1, d2 = weights[0].shape
    best, errors, reference = None, {}, None
    for atoms in candidates:
        try:
            shape = masa_shape(d1, d2, len(weights), ratio, atoms)
        except MasaError:
            continue  # these atoms alone exceed the budget
        # SVD-LLM's reference errors do not depend on S: computed for the first only
        solved = masa_group(weights, whitenings, shape, svd_rank if reference is None else None)
        if reference is None:
            reference = solved.svd_llm_errors
        else:
            solved.svd_llm_errors = reference
        errors[atoms] = sum(solved.relative_errors)
        if best is None or errors[atoms] < errors[best[0].atoms]:
            best = (shape, solved)
    if best is None:
        raise MasaError(f"no atom count of {list(candidates)} fits {d1} x {d2} at ratio {ratio}")
    return best[0], best[1], errors


def masa_units(layers: Sequence[int], targets: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(projection, members) of every MASA solve: each targeted type shared by the group."""
    return [(projection, tuple(layers)) for projection in targets]


def compress_group_masa(layers: Sequence[int], weight: Callable[[int, str], torch.Tensor],
                        whitening: Callable[[tuple[int, ...], str], object],
                        ratio: float, atoms: int | str, targets: Sequence[str]
                        ) -> GroupFactors:
    """MASA for every targeted projection of one group (``compress_group``'s contract:
    ``whitening((layer,), input)`` gives member ``layer``'s own whitening). ``atoms``: S, or
    ``"auto"`` for the best S in 0 .. m - 1 per projection (``best_atoms_group``)."""
    result = GroupFactors({layer: {} for layer in layers}, [], {layer: {} for layer in layers})
    for projection, members in masa_units(layers, targets):
        input_name = INPUT_OF[projection]
        weights = [weight(layer, projection) for layer in members]
        d1, d2 = weights[0].shape
        whitenings = [whitening((layer,), input_name) for layer in members]
        reference_rank = svd_rank(d1, d2, ratio).r
        if atoms == "auto":
            shape, solved, tried = best_atoms_group(weights, whitenings, ratio,
                                                    range(len(members)), reference_rank)
        else:
            shape = masa_shape(d1, d2, len(members), ratio, group_atoms(len(members), atoms))
            solved, tried = masa_group(weights, whitenings, shape, reference_rank), {}
        for index, (layer, factors) in enumerate(zip(members, solved.factors, strict=True)):
            result.factors[layer][projection] = factors
            # the diagnostics' convention: relative norms, not energies
            result.diagnostics[layer][projection] = {
                "error": solved.relative_errors[index] ** 0.5,
                "svd_llm_error": solved.svd_llm_errors[index] ** 0.5}
        result.solves.append({
            "projection": projection, "layers": list(members), "atoms": shape.atoms,
            "ranks": solved.ranks, "relative_errors": solved.relative_errors,
            **({"errors_by_atoms": {str(k): v for k, v in tried.items()}} if tried else {}),
            "whitening": next((p for p in solved.whitening_paths if p != "cholesky"),
                              "cholesky"),
            "shift": max(float(w.shift) for w in whitenings)})
    return result
