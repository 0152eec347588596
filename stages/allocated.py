"""Factorise a unit at the option the allocation chose for it (dictionary, low-rank, dense).

Dictionaries are solved by the configured solver (``solvers.py``: the closed-form solver
by default, refining from the same warm start the curves priced).

Same contract as :func:`stages.factorize.factorize_whitened` (whitened once, solved once,
sliced back per member), but the shape comes from the option, not from the ratio; a dense
option returns ``None`` (the projection stays as it is in the checkpoint). The achieved
relative functional error ``||W_L - R W_hat||^2 / ||W_L||^2`` is measured on the result.
"""

from __future__ import annotations

import torch

from .curves import Option
from .factorize import GroupResult, SolverSettings, check_weights
from .factors import DictionaryFactors, Factors, LowRankFactors
from .solvers import dictionary_solver
from .whitening import Whitening


def relative_error(whitened: torch.Tensor, whitening: Whitening, approx: torch.Tensor) -> float:
    """``||W_L - R approx||^2 / ||W_L||^2`` (approx in the original, un-whitened space)."""
    residual = whitened - whitening.whiten(approx.to(whitened.device))
    total = float(whitened.square().sum())
    return float(residual.square().sum()) / total if total else 0.0


def _lowrank(whitened: torch.Tensor, whitening: Whitening, r: int) -> LowRankFactors:
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = sigma[:r].sqrt()
    left = whitening.unwhiten(u[:, :r] * root)
    return LowRankFactors(left.float().cpu(), (root[:, None] * vh[:r]).float().cpu())


def _dictionary(whitened: torch.Tensor, whitening: Whitening, k: int, s: int,
                settings: SolverSettings) -> DictionaryFactors:
    solution = dictionary_solver(settings.solver)(whitened, k, s, settings)
    dictionary = whitening.unwhiten(solution.dictionary.to(torch.float64))
    return DictionaryFactors(dictionary.float().cpu(), solution.support.cpu(),
                             solution.values.float().cpu())


def factorize_option(weights: list[torch.Tensor], whitening: Whitening,
                     settings: SolverSettings, option: Option
                     ) -> tuple[GroupResult | None, float]:
    """Factors per member at ``option`` and the achieved relative error (0 when dense)."""
    check_weights(weights)
    if option.method == "dense":
        return None, 0.0
    device = whitening.factor.device
    stacked = torch.cat([w.to(device=device, dtype=torch.float64) for w in weights], dim=1)
    whitened = whitening.whiten(stacked)
    del stacked
    factors: Factors
    if option.method == "lowrank":
        factors = _lowrank(whitened, whitening, int(option.r))
    elif option.method == "dictionary":
        factors = _dictionary(whitened, whitening, int(option.k), int(option.s), settings)
    else:
        raise ValueError(f"unknown option method {option.method!r}")
    error = relative_error(whitened, whitening, factors.dense().to(torch.float64))
    members: list[Factors] = []
    start = 0
    for w in weights:
        members.append(factors.column_slice(start, start + w.shape[1]))
        start += w.shape[1]
    # "error" as the solvers' diagnostics state it: ||R (W - W_hat)|| / ||R W||, not squared
    stats = {"whitening_shift": whitening.shift, "error": error ** 0.5}
    return GroupResult(members, whitening.path, stats), error
