"""K-SVD on a (whitened) matrix: ``W ~ D S`` with unit-norm atoms and s non-zeros per column.

Each iteration: sparse coding by Batch-OMP (``omp.py``), then every atom in turn becomes
the rank-1 approximation (power iteration, warm-started at the current atom) of the
residual restricted to the columns that use it. The residual ``E = W - D S`` is updated in
place atom by atom, never recomputed from ``D S`` inside the sweep.

The atom update cannot increase the error (power iteration from the current atom never
lowers the Rayleigh quotient, and the new coefficients are least squares), but greedy OMP
can code a column worse than the codes it replaces: the paper's algorithm takes the fresh
codes anyway, and so does this one (the error may rise slightly between iterations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .omp import DEFAULT_MEMORY_BYTES, batch_omp

COHERENCE = 0.99  # atoms closer than this to another atom are redundant
REPLACE_STOP = 5  # iterations at the end with no atom replacement


@dataclass
class KSVDResult:
    dictionary: torch.Tensor  # d1 x k, unit-norm columns
    support: torch.Tensor  # s x d2 int64, ascending
    values: torch.Tensor  # s x d2
    errors: list[float] = field(default_factory=list)  # ||W - D S|| / ||W|| per iteration
    seconds_omp: float = 0.0
    seconds_update: float = 0.0


def initial_dictionary(matrix: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k distinct random columns of the matrix, normalised (seeded, device-independent)."""
    d1, d2 = matrix.shape
    generator = torch.Generator().manual_seed(seed)
    if k <= d2:
        picks = torch.randperm(d2, generator=generator)[:k]
    else:
        picks = torch.randint(d2, (k,), generator=generator)
    atoms = matrix[:, picks.to(matrix.device)].clone()
    noise = torch.randn(d1, k, generator=generator, dtype=torch.float64).to(atoms)
    norms = atoms.norm(dim=0)
    dead = norms <= 1e-12 * max(norms.max().item(), 1e-300)
    if k > d2:  # duplicated picks: perturb so atoms differ
        atoms = atoms + 1e-3 * norms.mean() * noise
    atoms[:, dead] = noise[:, dead]
    return atoms / atoms.norm(dim=0, keepdim=True)


def ksvd(matrix: torch.Tensor, k: int, s: int, iters: int, power_iters: int = 8, seed: int = 42,
         omp_chunk: int = 8192, memory_bytes: int = DEFAULT_MEMORY_BYTES,
         atoms_per_step: int = 1) -> KSVDResult:
    """Learn ``D`` (d1 x k) and s-sparse codes for ``matrix`` (d1 x d2), in its dtype/device."""
    import time

    d1, d2 = matrix.shape
    if not 1 <= s <= min(k, d1):
        raise ValueError(f"need 1 <= s <= min(k, d1); got s={s}, k={k}, d1={d1}")
    dictionary = initial_dictionary(matrix, k, seed)
    norm = matrix.norm().item() or 1.0
    result = KSVDResult(dictionary, None, None)  # type: ignore[arg-type]
    sync = torch.cuda.synchronize if matrix.is_cuda else (lambda: None)
    for iteration in range(iters):
        sync()
        start = time.perf_counter()
        gram, correlations = dictionary.T @ dictionary, dictionary.T @ matrix
        codes = batch_omp(gram, correlations, s, max_chunk=omp_chunk,
                          memory_bytes=memory_bytes, atoms_per_step=atoms_per_step).dense(k)
        residual = matrix - dictionary @ codes
        sync()
        middle = time.perf_counter()
        update_atoms(dictionary, codes, residual, power_iters)
        if iteration < iters - REPLACE_STOP:  # the last iterations only refine
            replace_redundant_atoms(dictionary, codes, residual)
        sync()
        result.seconds_omp += middle - start
        result.seconds_update += time.perf_counter() - middle
        result.errors.append(residual.norm().item() / norm)
    support = _support_of(codes, s)
    result.dictionary = dictionary
    result.support = support
    result.values = codes.gather(0, support)
    return result


def _support_of(codes: torch.Tensor, s: int) -> torch.Tensor:
    """The s atoms of each column (zero-valued ones fill up columns that use fewer)."""
    support = (codes != 0).to(torch.int8).argsort(dim=0, descending=True, stable=True)[:s]
    return support.sort(dim=0).values


def update_atoms(dictionary: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor,
                 power_iters: int) -> None:
    """One K-SVD dictionary sweep, in place on all three tensors."""
    k = dictionary.shape[1]
    reseeds = 0
    # The sweep gathers and scatters the residual's columns atom by atom: in a row-major
    # d1 x d2 matrix a column is strided (those copies were 60 % of the sweep), in the
    # transposed copy it is one contiguous row.
    residual_t = residual.T.contiguous()
    for j in range(k):
        users = codes[j].nonzero().squeeze(1)
        if users.numel() == 0:
            _reseed(dictionary, residual_t.T, j, reseeds)
            reseeds += 1
            continue
        atom = dictionary[:, j]
        coefficients = codes[j, users]
        restricted = residual_t[users].addr_(coefficients, atom)  # users x d1
        direction = atom
        for _ in range(power_iters):
            direction = restricted.T @ (restricted @ direction)
            length = direction.norm()
            if length == 0:
                direction = atom
                break
            direction = direction / length
        new_coefficients = restricted @ direction
        dictionary[:, j] = direction
        codes[j, users] = new_coefficients
        residual_t[users] = restricted.addr_(new_coefficients, direction, alpha=-1.0)
    residual.copy_(residual_t.T)


def _reseed(dictionary: torch.Tensor, residual: torch.Tensor, j: int, rank: int) -> None:
    """An unused atom becomes the residual direction of the ``rank``-th worst-fit column
    (distinct columns for distinct unused atoms)."""
    norms = residual.norm(dim=0)
    worst = norms.topk(min(rank + 1, norms.numel())).indices[-1]
    column = residual[:, worst]
    length = column.norm()
    if length > 0:
        dictionary[:, j] = column / length


def replace_redundant_atoms(dictionary: torch.Tensor, codes: torch.Tensor,
                            residual: torch.Tensor, coherence: float = COHERENCE) -> int:
    """K-SVD's escape from local minima, where two atoms share one group of columns while
    another group has none: unused atoms, atoms nearly parallel to an earlier one, and the
    cheapest atom when a fresh atom at the worst-fit column would clearly gain more, move
    to the worst-fit columns.

    Cost of dropping atom j ~ its code energy times the part of it no other atom explains,
    ``|S_j|^2 (1 - max_i (d_i . d_j)^2)``; gain of an atom v along the worst residual
    column ~ ``|R^T v|^2``. Only a clear win (cost < gain / 2) moves an atom, so a
    well-spread dictionary is left alone.
    """
    similarity = (dictionary.T @ dictionary).abs().fill_diagonal_(0.0)
    energy = codes.square().sum(dim=1)
    redundant = (similarity.triu(diagonal=1) > coherence).any(dim=0) | (energy == 0)
    column_energy = residual.square().sum(dim=0)
    worst = int(column_energy.argmax())
    if column_energy[worst] > 0:
        direction = residual[:, worst] / column_energy[worst].sqrt()
        gain = (residual.T @ direction).square().sum()
        cost = energy * (1.0 - similarity.max(dim=0).values.square())
        cheapest = int(cost.argmin())
        if cost[cheapest] < gain / 2:
            redundant[cheapest] = True
    targets = redundant.nonzero().squeeze(1)[: residual.shape[1]]
    if targets.numel() == 0:
        return 0
    residual.add_(dictionary[:, targets] @ codes[targets])
    codes[targets] = 0
    picks = residual.norm(dim=0).topk(targets.numel()).indices
    columns = residual[:, picks]
    lengths = columns.norm(dim=0, keepdim=True)
    ok = lengths.squeeze(0) > 0
    dictionary[:, targets[ok]] = (columns / lengths.clamp_min(1e-300))[:, ok]
    return int(targets.numel())
