"""CoSpaDi and SVD-LLM factorisers: whiten with the calibration Gram, solve, un-whiten.

A group is a list of weight matrices (math layout, d1 x d2_i, i.e. ``linear.weight.T``)
sharing one input space. Per-layer compression is a group of one. For a group the
matrices are concatenated along d2, whitened with the mean of the members' Grams, solved
once, and the result is sliced back per member (METHOD.md, per-group variant).

Gram averaging has one semantics: every Gram handed in is per token (``X^T X / N``, as
the pipeline divides each block's Gram by its token count), and a group's Gram is their
plain mean, each member counting equally whatever its token count.

The dictionary solver is picked by name (``solvers.py``); every dictionary solve records
its relative whitened functional error and SVD-LLM's at the same budget (``stats``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .factors import DictionaryFactors, Factors, LowRankFactors
from .omp import DEFAULT_MEMORY_BYTES
from .sizing import dictionary_shape, svd_rank
from .solvers import SOLVERS, default_iters, dictionary_solver
from .supports import honours, orthonormal_codes, parse_support
from .whitening import Whitening, whitening_from_gram


@dataclass(frozen=True)
class SolverSettings:
    method: str = "cospadi"  # "cospadi", "svd-llm" (here) or "masa" (its own module)
    ratio: float = 0.3
    rho: float = 2.0
    solver: str = "closed"  # dictionary solver (solvers.py): "closed" or "ksvd"
    iters: int | None = None  # solver iterations (None: the solver's default)
    refine_iters: int = 20  # closed solver: least-squares rounds on the fixed support, at most
    power_iters: int = 8  # ksvd: power iterations per atom update
    seed: int = 42
    omp_chunk: int = 8192  # ksvd: columns coded at once (upper bound; memory may lower it)
    omp_memory_bytes: int = DEFAULT_MEMORY_BYTES  # ksvd: OMP working memory per chunk
    atoms_per_step: int = 1  # 1: exact OMP; b > 1: gOMP, ~b x faster, somewhat worse codes
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # working precision of K-SVD (Grams stay float64)
    support: str = "free"  # free | 2:4 | block<B> (stages/supports.py)

    def __post_init__(self) -> None:
        if self.method not in ("cospadi", "svd-llm", "masa"):  # masa: stages/masa.py
            raise ValueError(f"method must be 'cospadi', 'svd-llm' or 'masa', "
                             f"got {self.method!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(sorted(SOLVERS))}, "
                             f"got {self.solver!r}")
        if not (0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must lie in (0, 1), got {self.ratio}")
        if not self.rho >= 1.0:
            raise ValueError(f"rho must be >= 1, got {self.rho}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.refine_iters < 0:
            raise ValueError(f"refine_iters must be >= 0, got {self.refine_iters}")
        if self.omp_memory_bytes < 1:
            raise ValueError(f"omp_memory_bytes must be >= 1, got {self.omp_memory_bytes}")
        if self.atoms_per_step < 1:
            raise ValueError(f"atoms_per_step must be >= 1, got {self.atoms_per_step}")
        if self.power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {self.power_iters}")
        parse_support(self.support)

    @property
    def solver_iters(self) -> int:
        return default_iters(self.solver) if self.iters is None else self.iters


@dataclass
class GroupResult:
    factors: list[Factors]  # one per member, in input order
    whitening_path: str  # "cholesky", "shifted-cholesky" or "eigen"
    stats: dict = field(default_factory=dict)


def mean_gram(grams: Iterable[torch.Tensor], owned: bool = False) -> torch.Tensor:
    """The members' mean (per-token) Gram in float64, summed one Gram at a time, so a generator that
    loads each from disk holds at most two d x d matrices; a lone float64 Gram is returned
    as is (for a 70B down_proj each copy is 6.6 GB). Inputs are not modified unless
    ``owned`` (fresh float64 Grams the caller discards): then the sum goes into the first."""
    total, count = None, 0
    for gram in grams:
        if total is None:
            total = gram
        elif gram.shape != total.shape:
            raise ValueError(f"Gram shapes differ within a group: {tuple(gram.shape)} vs "
                             f"{tuple(total.shape)}")
        else:
            if count == 1:  # a second member: from here on total must be writable
                total = total.to(torch.float64, copy=not owned)
            total += gram
        count += 1
    if total is None:
        raise ValueError("a group needs at least one Gram matrix")
    return total.to(torch.float64) if count == 1 else total.div_(count)


def check_weights(weights: list[torch.Tensor]) -> None:
    if not weights:
        raise ValueError("a group needs at least one weight matrix")
    d1 = weights[0].shape[0]
    for w in weights:
        if w.ndim != 2 or w.shape[0] != d1:
            raise ValueError(f"group members must share d1 = {d1}, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("weight matrix holds NaN or Inf values")


def group_whitening(grams: Iterable[torch.Tensor], settings: SolverSettings,
                    owned: bool = False) -> Whitening:
    """Whitening of a group's shared input: from the mean of the members' Grams
    (``owned``: see mean_gram)."""
    return whitening_from_gram(mean_gram(grams, owned).to(torch.device(settings.device)))


def factorize_group(weights: list[torch.Tensor], grams: list[torch.Tensor],
                    settings: SolverSettings) -> GroupResult:
    """Compress the matrices of one group against the mean of their per-token Grams."""
    if len(weights) != len(grams):
        raise ValueError(f"{len(weights)} weights but {len(grams)} Grams")
    return factorize_whitened(weights, group_whitening(grams, settings), settings)


def factorize_whitened(weights: list[torch.Tensor], whitening: Whitening,
                       settings: SolverSettings) -> GroupResult:
    """Compress the matrices of one group sharing an input whitened by ``whitening``
    (projections that read the same input, e.g. q, k and v, reuse one whitening)."""
    check_weights(weights)
    if whitening.factor.shape[0] != weights[0].shape[0]:
        raise ValueError(f"whitening is {tuple(whitening.factor.shape)} but the weights have "
                         f"d1 = {weights[0].shape[0]}")
    device = whitening.factor.device
    stacked = torch.cat([w.to(device=device, dtype=torch.float64) for w in weights], dim=1)
    whitened = whitening.whiten(stacked)
    del stacked
    if settings.method == "svd-llm":
        factors, stats = _solve_svd(whitened, whitening, settings)
    else:
        factors, stats = _solve_dictionary(whitened, whitening, settings)
    members: list[Factors] = []
    start = 0
    for w in weights:
        stop = start + w.shape[1]
        members.append(factors.column_slice(start, stop))
        start = stop
    stats["whitening_shift"] = whitening.shift
    return GroupResult(factors=members, whitening_path=whitening.path, stats=stats)


def factorize_layer(weight: torch.Tensor, gram: torch.Tensor,
                    settings: SolverSettings) -> GroupResult:
    return factorize_group([weight], [gram], settings)


def _solve_svd(whitened: torch.Tensor, whitening: Whitening,
               settings: SolverSettings) -> tuple[LowRankFactors, dict]:
    d1, d2 = whitened.shape
    r = svd_rank(d1, d2, settings.ratio).r
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = sigma[:r].sqrt()
    left = whitening.unwhiten(u[:, :r] * root)
    right = root[:, None] * vh[:r]
    error = _tail_error(sigma, r)
    return LowRankFactors(left.float().cpu(), right.float().cpu()), {
        "r": r, "error": error, "svd_llm_error": error}


def _tail_error(sigma: torch.Tensor, rank: int) -> float:
    """Relative error of the best rank-``rank`` approximation (Eckart-Young)."""
    energy = sigma.square()
    total = energy.sum().item()
    return (energy[rank:].sum().item() / total) ** 0.5 if total > 0 else 0.0


def _solve_dictionary(whitened: torch.Tensor, whitening: Whitening,
                      settings: SolverSettings) -> tuple[DictionaryFactors, dict]:
    d1, d2 = whitened.shape
    shape = dictionary_shape(d1, d2, settings.ratio, settings.rho, settings.support)
    support = parse_support(settings.support)
    solution = None
    if not support.structured or settings.solver == "closed":
        solution = dictionary_solver(settings.solver)(whitened, shape.k, shape.s, settings)
        if not honours(solution.support, shape.k, support):
            # a code refitted to exactly zero let another atom fill its column: the
            # structure is gone (never seen; measure-zero), so take the exact coder
            solution = None
    if solution is None:
        factors, stats = _solve_structured(whitened, whitening, shape.k, shape.s, support)
    else:
        stats = dict(solution.stats, solver=settings.solver)
        dictionary = whitening.unwhiten(solution.dictionary.to(torch.float64))
        factors = DictionaryFactors(dictionary.float().cpu(), solution.support.cpu(),
                                    solution.values.float().cpu(), support.name)
    if "svd_llm_error" not in stats:  # the closed solver has it from its warm start
        rank = svd_rank(d1, d2, settings.ratio).r
        stats["svd_llm_error"] = _tail_error(torch.linalg.svdvals(whitened), rank)
    return factors, stats


def _solve_structured(whitened: torch.Tensor, whitening: Whitening, k: int, s: int,
                      support) -> tuple[DictionaryFactors, dict]:
    """Structured supports (``2:4``, ``block<B>``) with ``--solver ksvd`` (whose OMP and
    atom sweep cannot keep a structure): the exact coder of an orthonormal dictionary
    (top-k whitened singular vectors, structured top selection of ``U^T W_L``)."""
    u, support_idx, values = orthonormal_codes(whitened, k, s, support)
    dictionary = whitening.unwhiten(u.to(torch.float64))
    codes = torch.zeros(k, whitened.shape[1], dtype=whitened.dtype, device=whitened.device)
    codes.scatter_(0, support_idx, values)
    error = float((whitened - u @ codes).norm() / whitened.norm().clamp_min(1e-30))
    factors = DictionaryFactors(dictionary.float().cpu(), support_idx.cpu(),
                                values.float().cpu(), support.name)
    return factors, {"k": k, "s": s, "error": error, "solver": f"orthonormal-{support.name}"}
