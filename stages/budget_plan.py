"""From every unit's curve to the chosen option per unit (``allocation.json``).

The byte budget is the uniform plan's: the bytes the configured method would store at the
configured ratio (and rho) on every unit, so a global run is compared with a uniform one at
equal bytes (never more). The proxy is the weighted sum of relative functional errors
(:func:`curves.proxy_weight`); the uniform plan's own option of every unit is in its curve
and is the reference the allocation may not be worse than.
"""

from __future__ import annotations

from dataclasses import dataclass

from .allocation import Allocation, allocate
from .curves import Option, UnitCurve, proxy_weight
from .sizing import LowRankShape, dictionary_bytes, dictionary_shape, svd_rank


@dataclass(frozen=True)
class UniformSpec:
    """What the uniform plan stores per unit."""

    method: str  # "cospadi" | "svd-llm"
    ratio: float
    rho: float

    def option_of(self, d1: int, d2: int) -> tuple[str, int, int | None, int | None, int | None]:
        """(method, bytes, k, s, r) of the uniform plan for a d1 x d2 unit."""
        if self.method == "svd-llm":
            r = svd_rank(d1, d2, self.ratio).r
            return "lowrank", LowRankShape(d1=d1, d2=d2, r=r).bytes, None, None, r
        shape = dictionary_shape(d1, d2, self.ratio, self.rho)
        return ("dictionary", dictionary_bytes(d1, d2, shape.k, shape.s), shape.k, shape.s,
                None)


def uniform_index(curve: UnitCurve, spec: UniformSpec) -> int:
    method, _, k, s, r = spec.option_of(curve.d1, curve.d2)
    for index, option in enumerate(curve.options):
        if option.method == method and (option.k, option.s, option.r) == (k, s, r):
            return index
    raise ValueError(f"{curve.key}: its curve lacks the uniform plan's option "
                     f"({method} k={k} s={s} r={r})")


@dataclass
class BudgetPlan:
    curves: list[UnitCurve]
    weights: list[float]
    allocation: Allocation
    uniform: list[int]  # the uniform plan's option index per unit
    uniform_value: float  # its proxy value

    def chosen(self, unit: int) -> Option:
        return self.curves[unit].options[self.allocation.choice[unit]]

    def as_dict(self) -> dict:
        alloc = self.allocation
        units = {}
        for index, curve in enumerate(self.curves):
            option = self.chosen(index)
            base = curve.options[self.uniform[index]]
            units[curve.key] = {"projection": curve.projection, "layers": list(curve.layers),
                                "d1": curve.d1, "d2": curve.d2, "weight": self.weights[index],
                                "chosen": option.as_dict(), "uniform": base.as_dict()}
        return {"budget": alloc.budget, "bytes": alloc.bytes, "proxy": alloc.value,
                "lower_bound": alloc.lower_bound, "gap": alloc.gap,
                "multiplier": None if alloc.multiplier != alloc.multiplier else alloc.multiplier,
                "uniform_proxy": self.uniform_value,
                "units": units}


def plan_budgets(curves: list[UnitCurve], spec: UniformSpec, weighting: str,
                 parts: list[int] | None = None,
                 sensitivity: dict[str, float] | None = None,
                 band: float = 0.0) -> BudgetPlan:
    """Allocate the uniform plan's bytes over ``curves`` (order kept).

    ``parts`` (one label per unit): each part keeps its own uniform bytes and is allocated
    alone (``--allocation block``: the depth profile stays the uniform plan's); the gap and
    bound are then the parts' sums. ``sensitivity``: per-matrix loss sensitivities for the
    ``loss`` weighting. ``band`` > 0: every unit's bytes stay within ``(1 -/+ band)`` x its
    uniform bytes (a trust region where the proxy is least reliable: far from uniform).
    """
    weights = [proxy_weight(curve, weighting, sensitivity) for curve in curves]
    scale = sum(weights) or 1.0
    weights = [w / scale for w in weights]  # proxy = weighted mean relative error
    uniform = [uniform_index(curve, spec) for curve in curves]
    options = []
    for curve, w, base in zip(curves, weights, uniform, strict=True):
        lo, hi = in_band(curve.options[base].bytes, band)
        # out-of-band options priced out (never chosen, indices kept for the plan)
        options.append([(o.bytes, w * o.error if lo <= o.bytes <= hi or i == base
                         else float(BARRED)) for i, o in enumerate(curve.options)])
    budget = sum(curve.options[i].bytes for curve, i in zip(curves, uniform, strict=True))
    if parts is None:
        allocation = allocate(options, budget, reference=uniform)
    else:
        allocation = _allocate_parts(options, uniform, parts)
    uniform_value = sum(options[u][i][1] for u, i in enumerate(uniform))
    return BudgetPlan(curves, weights, allocation, uniform, uniform_value)


BARRED = 1e30  # error of an option outside the band: finite, so the solver's sums stay exact


def in_band(uniform_bytes: int, band: float) -> tuple[float, float]:
    """Bytes a unit may take around its uniform bytes (``band`` 0: any)."""
    if band < 0 or band >= 1:
        raise ValueError(f"allocation-band must lie in [0, 1), got {band}")
    if band == 0:
        return 0.0, float("inf")
    return uniform_bytes * (1.0 - band), uniform_bytes * (1.0 + band)


def _allocate_parts(options: list[list[tuple[int, float]]], uniform: list[int],
                    parts: list[int]) -> Allocation:
    """Each part allocated alone within its uniform bytes; results combined."""
    if len(parts) != len(options):
        raise ValueError(f"{len(parts)} part labels for {len(options)} units")
    choice = list(uniform)
    total = budget = 0
    value = bound = 0.0
    for part in sorted(set(parts)):
        units = [u for u, p in enumerate(parts) if p == part]
        part_budget = sum(options[u][uniform[u]][0] for u in units)
        result = allocate([options[u] for u in units], part_budget,
                          reference=[uniform[u] for u in units])
        for u, index in zip(units, result.choice, strict=True):
            choice[u] = index
        total += result.bytes
        budget += part_budget
        value += result.value
        bound += result.lower_bound
    return Allocation(tuple(choice), total, budget, value, bound, float("nan"))
