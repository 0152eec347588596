"""The tasks of ``--allocation global``: curves per group, one allocation, budgets to factor.

``curves-G`` reads group G's Grams (kept for its factor task), whitens each solve unit's
weight as the factor task will and writes the unit's options with their predicted errors
(``<work>/curves/group_G.json``). ``allocate`` reads every curve file, solves the knapsack
and writes ``<work>/allocation.json``. ``factor-G`` then solves each unit at its chosen
option. All files are written atomically and each task records itself done afterwards, so
the pass resumes like every other stage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..stages.allocation import AllocationError
from ..stages.budget_plan import UniformSpec, plan_budgets
from ..stages.compress_block import solve_units
from ..stages.curves import Option, UnitCurve, calibrated, spectrum, unit_curve, unit_key
from ..stages.projections import INPUT_OF, module_path
from ..stages.sizing import dictionary_shape
from ..storage.atomic import write_json
from ..storage.gram_store import read_grams
from .manifest import is_done, mark_done
from .tasks import Job, _setup, device_gate, solver_settings, task

log = logging.getLogger("cospadi")

ALLOCATE = "allocate"
# the short solve that calibrates a unit's dictionary curve (closed solver: alternation
# steps and least-squares rounds; a full solve takes 20 and 4)
CALIBRATION_ITERS, CALIBRATION_REFINE = 2, 1


def curves_name(group: int) -> str:
    return f"curves-{group:04d}"


def curves_path(job: Job, group: int) -> Path:
    return job.work.root / "curves" / f"group_{group:04d}.json"


def allocation_path(job: Job) -> Path:
    return job.work.root / "allocation.json"


def uniform_spec(job: Job) -> UniformSpec:
    cfg = job.config
    return UniformSpec(cfg.method, cfg.ratio, cfg.rho)


def _group_whitening(members: tuple[int, ...], input_name: str, job: Job, settings):
    from ..stages.factorize import group_whitening

    def per_token_grams():
        for layer in members:  # one at a time: the mean holds at most two
            grams, tokens = read_grams(job.work.grams(layer), [input_name])
            yield grams.pop(input_name).div_(tokens)

    return group_whitening(per_token_grams(), settings, owned=True)


@task
def run_curves(job: Job, group_index: int, *_deps: object) -> str:
    name = curves_name(group_index)
    if is_done(job.work, name):
        return name
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    settings = solver_settings(job)
    spec = uniform_spec(job)
    layers = job.groups[group_index]
    curves: list[dict] = []
    held: dict[tuple[tuple[int, ...], str], object] = {}
    with device_gate(job.device):
        for projection, members in solve_units(layers, job.config.target_projections):
            input_name = INPUT_OF[projection]
            if (members, input_name) not in held:
                held.clear()
                held[(members, input_name)] = _group_whitening(members, input_name, job,
                                                               settings)
            whitening = held[(members, input_name)]
            weights = []
            for layer in members:
                key = f"{module_path(skeleton.base_prefix, layer, projection)}.weight"
                weights.append(reader.load([key], dtype=torch.float64)[key].T)
            stacked = torch.cat(weights, dim=1).to(whitening.factor.device)
            whitened = whitening.whiten(stacked)
            d1, d2 = whitened.shape
            extra = ()
            if spec.method == "cospadi":
                shape = dictionary_shape(d1, d2, spec.ratio, spec.rho)
                extra = ((shape.k, shape.s),)
            whitened = whitened.to(torch.float64)
            sigma, codes = spectrum(whitened)  # on the device, shared with the short solve
            curve = unit_curve(projection, members, whitened.cpu(),
                               with_dictionary=spec.method == "cospadi", extra=extra,
                               spectral=(sigma.cpu(), codes.cpu()))
            record = curve.as_dict()
            if spec.method == "cospadi":
                short = replace(settings, iters=CALIBRATION_ITERS,
                                refine_iters=CALIBRATION_REFINE)
                achieved = _short_solve_error(whitened, codes, shape.k, shape.s,
                                              short)
                curve = calibrated(curve, shape.k, shape.s, achieved)
                record = dict(curve.as_dict(), calibration={"k": shape.k, "s": shape.s,
                                                            "achieved": achieved})
            curves.append(record)
    seconds = time.perf_counter() - start
    write_json(curves_path(job, group_index), {"group": list(layers), "units": curves})
    mark_done(job.work, name, {"seconds": seconds, "units": len(curves)})
    log.info("layers %s: error curves of %d matrices in %.1f s", list(layers), len(curves),
             seconds)
    return name


def _short_solve_error(whitened: torch.Tensor, codes: torch.Tensor, k: int, s: int,
                       settings) -> float:
    """Relative squared error a short solve of the configured solver reaches at (k, s).

    The closed solver runs on the unit's ``codes = Sigma V^T`` (from the curve's
    spectrum; the error is the same in that basis), which spares it a second SVD."""
    from ..stages.solver_closed import solve_closed
    from ..stages.solvers import dictionary_solver
    from ..stages.supports import parse_support

    if settings.solver == "closed" and not parse_support(settings.support).structured:
        solution = solve_closed(codes, k, s, iters=settings.solver_iters,
                                refine=settings.refine_iters, dtype=settings.dtype,
                                rotated=True)
        return solution.stats["error"] ** 2  # the solver records the relative norm
    solution = dictionary_solver(settings.solver)(whitened, k, s, settings)
    dense = torch.zeros(k, whitened.shape[1], dtype=torch.float64, device=whitened.device)
    dense.scatter_(0, solution.support.to(whitened.device),
                   solution.values.to(device=whitened.device, dtype=torch.float64))
    residual = whitened - solution.dictionary.to(whitened.device, torch.float64) @ dense
    total = float(whitened.square().sum())
    return float(residual.square().sum()) / total if total else 0.0


def read_curves(job: Job) -> list[UnitCurve]:
    curves = []
    for group in range(len(job.groups)):
        path = curves_path(job, group)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise AllocationError(f"curve file {path} is unreadable: {err}") from err
        curves += [UnitCurve.from_dict(unit) for unit in data["units"]]
    return curves


@task
def run_allocate(job: Job, *_deps: object) -> str:
    if is_done(job.work, ALLOCATE):
        return ALLOCATE
    start = time.perf_counter()
    curves = read_curves(job)
    parts = None
    if job.config.allocation == "block":  # every group keeps the uniform plan's bytes
        parts = [job.group_of(curve.layers[0]) for curve in curves]
    cfg = job.config
    sensitivity = None
    if cfg.allocation_weight == "loss":
        from .sensitivity_tasks import read_block_sensitivities

        sensitivity = read_block_sensitivities(job)
    plan = plan_budgets(curves, uniform_spec(job), cfg.allocation_weight, parts,
                        sensitivity=sensitivity, band=cfg.allocation_band)
    summary = plan.as_dict()
    write_json(allocation_path(job), summary)
    methods: dict[str, int] = {}
    for unit in summary["units"].values():
        methods[unit["chosen"]["method"]] = methods.get(unit["chosen"]["method"], 0) + 1
    info = {key: summary[key] for key in ("budget", "bytes", "proxy", "lower_bound", "gap",
                                          "uniform_proxy")}
    mark_done(job.work, ALLOCATE, {"seconds": time.perf_counter() - start, **info,
                                   "methods": methods})
    log.info("allocation: %d of %d bytes, proxy %.5f (uniform %.5f, gap <= %.2g); %s",
             summary["bytes"], summary["budget"], summary["proxy"], summary["uniform_proxy"],
             summary["gap"], ", ".join(f"{n} {m}" for m, n in sorted(methods.items())))
    return ALLOCATE


def read_allocation(job: Job) -> dict:
    path = allocation_path(job)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AllocationError(f"allocation file {path} is unreadable: {err}") from err


def allocated_solvers(job: Job) -> tuple[Callable[[str, tuple[int, ...]], object], dict]:
    """``unit_solver(projection, members)`` for compress_group (None: keep dense) and the
    per-unit records (chosen option, predicted and achieved error) it fills."""
    from ..stages.allocated import factorize_option

    units = read_allocation(job)["units"]
    records: dict[str, dict] = {}

    def unit_solver(projection: str, members: tuple[int, ...]):
        key = unit_key(projection, members)
        if key not in units:
            raise AllocationError(f"allocation file {allocation_path(job)} has no budget "
                                  f"for {key}")
        option = Option.from_dict(units[key]["chosen"])
        record = {"layers": list(members), "predicted": option.error,
                  **{k: v for k, v in option.as_dict().items() if k != "error"}}
        records[key] = record
        if option.method == "dense":
            record["achieved"] = 0.0
            return None

        def solve(weights, whitening, settings):
            result, error = factorize_option(weights, whitening, settings, option)
            record["achieved"] = error
            return result
        return solve

    return unit_solver, records


def layer_records(records: dict, skeleton_prefix: str, layer: int) -> dict:
    """The allocation records of one layer's modules, keyed by module path."""
    out = {}
    for key, record in records.items():
        projection = key.partition("@")[0]
        if layer in record["layers"]:
            out[module_path(skeleton_prefix, layer, projection)] = record
    return out


def format_allocation(records: dict[str, dict], title: str = "allocation") -> str:
    """One line per matrix: method, k / s or r, bytes, predicted and achieved error."""
    lines = [f"{title} (errors: relative squared functional, ||R(W - W_hat)||^2 / ||RW||^2)",
             f"  {'matrix':<40}{'method':>11}{'k':>6}{'s':>6}{'r':>6}{'bytes':>10}"
             f"{'predicted':>11}{'achieved':>10}"]
    counts: dict[str, int] = {}
    for name, record in records.items():
        method = record.get("method", "?")
        counts[method] = counts.get(method, 0) + 1
        achieved = record.get("achieved")
        lines.append(f"  {name:<40}{method:>11}{record.get('k') or '-':>6}"
                     f"{record.get('s') or '-':>6}{record.get('r') or '-':>6}"
                     f"{record.get('bytes', 0):>10}{record.get('predicted', 0.0):>11.4f}"
                     f"{'-' if achieved is None else f'{achieved:.4f}':>10}")
    lines.append("  methods: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items())))
    return "\n".join(lines)


def plan_records(summary: dict) -> dict[str, dict]:
    """allocation.json's units as format_allocation records (chosen option, predicted)."""
    out = {}
    for key, unit in summary["units"].items():
        chosen = dict(unit["chosen"])
        chosen["predicted"] = chosen.pop("error")
        out[key] = chosen
    return out


def dry_run_allocation(work_root: Path) -> str:
    """What ``--dry-run`` can say about a global allocation before or after it ran."""
    path = Path(work_root) / "allocation.json"
    if not path.is_file():
        return ("allocation global: budget = the bytes of the uniform plan above; each "
                "matrix's method and size are chosen after the curve pass (it needs the "
                "calibration Grams), then shown here and by `cospadi inspect`")
    summary = json.loads(path.read_text())
    head = (f"allocation global (from {path}): {summary['bytes']} of {summary['budget']} "
            f"bytes, proxy {summary['proxy']:.5f} against uniform "
            f"{summary['uniform_proxy']:.5f}, optimality gap <= {summary['gap']:.2g}")
    return head + "\n" + format_allocation(plan_records(summary), "chosen per matrix")
