"""Factorise the projections of a group of consecutive blocks (METHOD.md's grouping).

Within a group, q, k, v, gate and up of all members share one dictionary (one solve over
the concatenated matrices, whitened by the mean Gram); o and down are solved per layer.
A group of one is plain per-layer compression.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .factors import Factors
from .projections import INPUT_OF, PROJECTIONS, SHARED_IN_GROUP

# factorize_whitened(weights, whitening, settings)
Solver = Callable[[list[torch.Tensor], object, object], object]


def plan_groups(num_layers: int, group_size: int) -> list[tuple[int, ...]]:
    """Consecutive layers in groups of ``group_size`` (the last may be shorter)."""
    if not 1 <= group_size <= num_layers:
        raise ValueError(f"group size must lie in [1, {num_layers}] (the model's depth), "
                         f"got {group_size}")
    return [tuple(range(start, min(start + group_size, num_layers)))
            for start in range(0, num_layers, group_size)]


DIAGNOSTICS = ("error", "svd_llm_error")  # relative whitened functional errors


@dataclass
class GroupFactors:
    factors: dict[int, dict[str, Factors]]  # layer -> projection -> factors
    solves: list[dict] = field(default_factory=list)  # one record per solver call
    # layer -> projection -> achieved error and SVD-LLM's at the same budget (a shared
    # solve's figures, over the whole group, are repeated for each member)
    diagnostics: dict[int, dict[str, dict]] = field(default_factory=dict)


def solve_units(layers: Sequence[int], targets: Sequence[str] = PROJECTIONS
                ) -> list[tuple[str, tuple[int, ...]]]:
    """(projection, member layers) of every solver call for a group, in a fixed order;
    projections not in ``targets`` are not solved (they stay dense)."""
    units = []
    for projection in PROJECTIONS:
        if projection not in targets:
            continue
        if projection in SHARED_IN_GROUP:
            units.append((projection, tuple(layers)))
        else:
            units.extend((projection, (layer,)) for layer in layers)
    return units


def compress_group(layers: Sequence[int],
                   weight: Callable[[int, str], torch.Tensor],
                   whitening: Callable[[tuple[int, ...], str], object],
                   settings: object, solver: Solver,
                   targets: Sequence[str] = PROJECTIONS,
                   unit_solver: Callable[[str, tuple[int, ...]], Solver | None] | None = None
                   ) -> GroupFactors:
    """Solve every projection of ``layers``.

    ``weight(layer, projection)`` gives W (d1 x d2, math layout) and
    ``whitening(members, input)`` the whitening of that input from the members' mean Gram,
    both loaded on demand so only one projection's matrices are held at a time (units
    sharing an input come one after another, so a one-entry cache serves q, k, v).
    ``unit_solver(projection, members)``, if given, picks the solver of each unit (the
    allocated budgets); None keeps that unit dense (no factors).
    """
    result = GroupFactors({layer: {} for layer in layers}, [], {layer: {} for layer in layers})
    for projection, members in solve_units(layers, targets):
        input_name = INPUT_OF[projection]
        solve = solver if unit_solver is None else unit_solver(projection, members)
        if solve is None:
            continue
        solved = solve([weight(layer, projection) for layer in members],
                       whitening(members, input_name), settings)
        figures = {key: float(solved.stats[key]) for key in DIAGNOSTICS if key in solved.stats}
        for layer, factors in zip(members, solved.factors, strict=True):
            result.factors[layer][projection] = factors
            result.diagnostics[layer][projection] = figures
        result.solves.append({"projection": projection, "layers": list(members),
                              "whitening": solved.whitening_path,
                              "shift": float(solved.stats.get("whitening_shift", 0.0)),
                              **figures})
    return result
