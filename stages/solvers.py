"""The dictionary solvers behind ``--solver``, one module each, behind one interface.

A solver maps a whitened matrix (d1 x d2, float64), the target shape (k atoms, s non-zeros
per column) and the solver settings to a :class:`DictionarySolution` in whitened space;
``factorize`` whitens before and un-whitens after, so a solver never sees a Gram.

- ``closed`` (default, ``solver_closed.py``): SVD warm start, orthonormal alternation
  (hard-thresholded codes, Procrustes dictionary), least-squares refinement; structured
  supports (``--support 2:4|block<B>``) through the same steps with their selection rule.
- ``ksvd`` (``ksvd.py`` + ``omp.py``): the paper's K-SVD with Batch-OMP, for reproduction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .factors import DictionarySolution
from .ksvd import ksvd
from .sizing import svd_rank
from .solver_closed import solve_closed
from .supports import as_rule, atom_order, parse_support, top_s

if TYPE_CHECKING:
    from .factorize import SolverSettings

DictionarySolver = Callable[[torch.Tensor, int, int, "SolverSettings"], DictionarySolution]

KSVD_ITERS = 60  # the paper's setting
CLOSED_ITERS = 15


def default_iters(solver: str) -> int:
    return KSVD_ITERS if solver == "ksvd" else CLOSED_ITERS


def _closed(whitened: torch.Tensor, k: int, s: int, settings: SolverSettings
            ) -> DictionarySolution:
    rank = svd_rank(*whitened.shape, settings.ratio).r  # SVD-LLM's, for the diagnostics
    support = parse_support(settings.support)
    # every step keeps the structure: thresholding by the structure's rule is the exact
    # code of an orthonormal dictionary, and the refinement only refits on the support
    rule = as_rule(support) if support.structured else top_s
    order = atom_order(min(k, *whitened.shape), support) if support.structured else None
    return solve_closed(whitened, k, s, iters=settings.solver_iters,
                        refine=settings.refine_iters, rule=rule, order=order,
                        shared_columns=max(support.block, 1), svd_rank=rank,
                        dtype=settings.dtype)


def _ksvd(whitened: torch.Tensor, k: int, s: int, settings: SolverSettings
          ) -> DictionarySolution:
    result = ksvd(whitened.to(settings.dtype), k, s, iters=settings.solver_iters,
                  power_iters=settings.power_iters, seed=settings.seed,
                  omp_chunk=settings.omp_chunk, memory_bytes=settings.omp_memory_bytes,
                  atoms_per_step=settings.atoms_per_step)
    stats = {"k": k, "s": s, "errors": result.errors, "error": result.errors[-1],
             "seconds_omp": result.seconds_omp, "seconds_update": result.seconds_update}
    return DictionarySolution(result.dictionary.to(torch.float64), result.support,
                              result.values.to(torch.float64), stats)


SOLVERS: dict[str, DictionarySolver] = {"closed": _closed, "ksvd": _ksvd}


def dictionary_solver(name: str) -> DictionarySolver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(sorted(SOLVERS))}") \
            from None
