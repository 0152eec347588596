"""Global budget allocation: one option per matrix, total bytes within a budget.

Every solve unit (a projection of one layer, or of a group of layers sharing a dictionary)
offers a list of options, each with the bytes it stores and its predicted error on the
model-level loss proxy (see :mod:`stages.curves`: weighted relative functional error).
Picking one option per unit so that the summed bytes stay within the budget and the summed
error is minimal is a multiple-choice knapsack. It is solved here in two steps:

1. **Lagrangian (convex-hull greedy).** Each unit's options are reduced to their lower
   convex hull in the (bytes, error) plane; starting from every unit's cheapest option,
   hull upgrades are taken in order of error saved per byte while they fit. This is the
   exact minimiser of ``sum error + lambda * sum bytes`` at the multiplier ``lambda`` of
   the first upgrade that does not fit, hence optimal for the budget it spends.
2. **Fill.** The bytes left are spent by repeatedly taking, over all units and *all* of
   their options (hull or not), the change that fits and saves the most error per extra
   byte, until no change fits and lowers the error.

The result is never worse on the proxy than the ``reference`` assignment given (the
uniform plan): if it were, the reference, filled the same way, is returned instead.

Optimality gap: Lagrangian duality gives ``L(lambda) = sum_i min_o (e_io + lambda b_io)
- lambda B <= OPT`` for every ``lambda >= 0``; it is largest at the ``lambda`` where the
hull greedy stopped. ``Allocation.gap`` is the proxy value minus that bound, an upper bound
on the distance to the true optimum (typically one unit's hull step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class AllocationError(ValueError):
    """The budget cannot be met (the message says by how much)."""


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # index of the chosen option per unit
    bytes: int  # total bytes of the choice (<= budget)
    budget: int
    value: float  # proxy: summed error of the choice
    lower_bound: float  # Lagrangian dual bound on the optimal proxy value
    multiplier: float  # lambda where the hull greedy stopped (error per byte)

    @property
    def gap(self) -> float:
        """Proxy value minus the dual bound: how far from optimal it can be at most."""
        return max(0.0, self.value - self.lower_bound)

    @property
    def slack(self) -> int:
        return self.budget - self.bytes


def lower_hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, error), by increasing cost and
    strictly decreasing error (dominated and non-convex options left out)."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errors[i]))
    hull: list[int] = []
    for i in order:
        if hull and errors[i] >= errors[hull[-1]]:
            continue  # costs at least as much and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: not on the lower hull
            cross = (costs[b] - costs[a]) * (errors[i] - errors[a]) - \
                (errors[b] - errors[a]) * (costs[i] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _as_arrays(options: Sequence[Sequence[tuple[int, float]]]
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    costs, errors = [], []
    for unit, opts in enumerate(options):
        if not opts:
            raise AllocationError(f"unit {unit} has no options")
        c = np.array([o[0] for o in opts], dtype=np.int64)
        e = np.array([o[1] for o in opts], dtype=np.float64)
        if (c < 0).any() or not np.isfinite(e).all():
            raise AllocationError(f"unit {unit}: option bytes must be >= 0 and errors finite")
        costs.append(c)
        errors.append(e)
    return costs, errors


def _fill(choice: list[int], costs: list[np.ndarray], errors: list[np.ndarray],
          budget: int) -> list[int]:
    """Spend what is left: best error saved per extra byte, one change at a time."""
    total = sum(int(c[i]) for c, i in zip(costs, choice, strict=True))
    while True:
        left = budget - total
        best, best_rate = None, 0.0
        for unit, (c, e) in enumerate(zip(costs, errors, strict=True)):
            cur = choice[unit]
            extra = c - c[cur]
            saved = e[cur] - e
            ok = (extra <= left) & (saved > 0)
            if not ok.any():
                continue
            # free or cheaper and better: infinitely good; else saved per byte
            rate = np.where(extra > 0, saved / np.maximum(extra, 1), np.inf)
            rate = np.where(ok, rate, -1.0)
            j = int(np.argmax(rate))
            if rate[j] > best_rate:
                best, best_rate = (unit, j), float(rate[j])
        if best is None:
            return choice
        unit, j = best
        total += int(costs[unit][j] - costs[unit][choice[unit]])
        choice[unit] = j


def _value(choice: Sequence[int], errors: list[np.ndarray]) -> float:
    return float(sum(e[i] for e, i in zip(errors, choice, strict=True)))


def _bytes(choice: Sequence[int], costs: list[np.ndarray]) -> int:
    return int(sum(int(c[i]) for c, i in zip(costs, choice, strict=True)))


def allocate(options: Sequence[Sequence[tuple[int, float]]], budget: int,
             reference: Sequence[int] | None = None) -> Allocation:
    """One option per unit, summed bytes <= ``budget``, summed error (near-)minimal.

    ``options[u]`` lists ``(bytes, error)`` of unit u's options. ``reference``, if given,
    is an assignment (one index per unit) the result must not be worse than, e.g. the
    uniform plan; it must itself fit the budget.
    """
    costs, errors = _as_arrays(options)
    floor = sum(int(c.min()) for c in costs)
    if floor > budget:
        raise AllocationError(f"budget of {budget} bytes is below the {floor} bytes of the "
                              "cheapest option of every matrix")
    hulls = [lower_hull(c, e) for c, e in zip(costs, errors, strict=True)]
    position = [0] * len(hulls)  # index into each hull
    # upgrades: (error saved per byte, unit, hull step); within a unit rates decrease
    upgrades = []
    for unit, hull in enumerate(hulls):
        c, e = costs[unit], errors[unit]
        for step in range(1, len(hull)):
            a, b = hull[step - 1], hull[step]
            rate = (e[a] - e[b]) / max(int(c[b] - c[a]), 1)
            upgrades.append((-rate, unit, step))
    upgrades.sort()
    total = sum(int(costs[u][h[0]]) for u, h in enumerate(hulls))
    multiplier = 0.0
    for neg_rate, unit, step in upgrades:
        if position[unit] != step - 1:
            continue  # an earlier step of this unit did not fit
        hull, c = hulls[unit], costs[unit]
        extra = int(c[hull[step]] - c[hull[step - 1]])
        if total + extra > budget:
            multiplier = -neg_rate
            break
        total += extra
        position[unit] = step
    choice = [hull[p] for hull, p in zip(hulls, position, strict=True)]
    choice = _fill(choice, costs, errors, budget)
    if reference is not None:
        reference = list(reference)
        if len(reference) != len(costs):
            raise AllocationError(f"reference has {len(reference)} entries for "
                                  f"{len(costs)} units")
        if _bytes(reference, costs) <= budget:
            alternative = _fill(reference, costs, errors, budget)
            if _value(alternative, errors) < _value(choice, errors):
                choice = alternative
    bound = float(sum((e + multiplier * c).min() for c, e in zip(costs, errors, strict=True))
                  - multiplier * budget)
    return Allocation(tuple(choice), _bytes(choice, costs), int(budget),
                      _value(choice, errors), bound, multiplier)
