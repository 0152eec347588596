"""Expected time per stage for ``--dry-run``: FLOP counts over this device's measured rates.

A few-second micro-benchmark measures the rates the stages run at (dense matmul in the
compute dtype and in float32 / float64, an SVD and a Cholesky as effective FLOP rates, and
a disk write); the plan's shapes give each stage's FLOPs. Estimates, not promises: they
leave out Python overheads, I/O overlap and (on a shared machine) other jobs.

FLOP models (T calibration tokens, L blocks, per solve d1 x d2, k atoms, s non-zeros,
m = min(d1, d2)):

- capture: the block forward, ``2 T sum(d1 d2)`` plus attention ``4 T seq_len hidden``,
  in the compute dtype;
- Grams: ``2 T d^2`` per unique input (float64);
- whitening: Cholesky ``d^3 / 3`` per unique input and group, ``2 d1^2 d2`` to whiten and
  ``d1^2 k`` to un-whiten each solve (float64);
- solve: SVD-LLM one SVD (``m^2 max(d1, d2)`` at the SVD rate); ``closed`` that SVD plus
  per alternation iteration ``4 k m d2`` (float32) and an ``m x k`` SVD, plus per
  refinement round ``8 k m d2 + 2 (steps + 2) k^2 d2`` (float64; every round counted,
  though the solver stops early when a round gains little); ``ksvd`` per iteration
  ``d2 (k s^2 / 2 + s^3 / 3) + 2 (2p + 1) d1 s d2`` at ``KSVD_MATMUL_FRACTION`` of the
  float32 matmul rate (what Batch-OMP and the atom sweep reached on CPU, README);
- assembly: the output bytes at the measured write rate.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..stages.solver_closed import DEFAULT_CG_STEPS

KSVD_MATMUL_FRACTION = 0.05  # measured 0.03-0.06 for K-SVD iterations (README, one core)
CLOSED_CG_STEPS = DEFAULT_CG_STEPS  # per code refit of a refinement round


@dataclass(frozen=True)
class Rates:
    """FLOP/s (and bytes/s for the disk) measured on the device."""

    matmul_compute: float
    matmul32: float
    matmul64: float
    svd64: float  # m^2 n / seconds for an m x n SVD
    cholesky64: float  # (d^3 / 3) / seconds
    disk_write: float


def _timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def measure_rates(device: str, compute_dtype: str, disk_dir: str | os.PathLike,
                  n: int = 1024) -> Rates:
    """A few seconds of micro-benchmarks on ``device`` (and a 64 MiB write to disk_dir)."""
    dev = torch.device(device)

    def matmul(dtype: torch.dtype) -> float:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        return 2 * n**3 / _timed(lambda: a @ a, dev)

    compute = getattr(torch, compute_dtype)
    half = n // 2
    tall = torch.randn(half, n, device=dev, dtype=torch.float64)
    svd = half * half * n / _timed(lambda: torch.linalg.svd(tall, full_matrices=False), dev, 2)
    spd = tall @ tall.T + n * torch.eye(half, device=dev, dtype=torch.float64)
    cholesky = half**3 / 3 / _timed(lambda: torch.linalg.cholesky(spd), dev)
    payload = os.urandom(64 << 20)
    Path(disk_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=disk_dir, prefix=".cospadi-rate-") as handle:
        start = time.perf_counter()
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
        disk = len(payload) / (time.perf_counter() - start)
    return Rates(matmul(compute), matmul(torch.float32), matmul(torch.float64), svd,
                 cholesky, disk)


def solve_seconds(d1: int, d2: int, k: int | None, s: int | None, r: int | None,
                  solver: str, iters: int, refine: int, power_iters: int,
                  rates: Rates) -> float:
    """Seconds of one solve (d2 already summed over a group's members)."""
    m = min(d1, d2)
    svd = m * m * max(d1, d2) / rates.svd64
    if r is not None:  # SVD-LLM
        return svd
    assert k is not None and s is not None
    if solver == "ksvd":
        flops = d2 * (k * s * s / 2 + s**3 / 3) + 2 * (2 * power_iters + 1) * d1 * s * d2
        return iters * flops / (KSVD_MATMUL_FRACTION * rates.matmul32)
    k0 = min(k, m)
    iteration = 4 * k0 * m * d2 / rates.matmul32 + m * k0 * k0 / rates.svd64
    rounds = (8 * k * m * d2 + 2 * (CLOSED_CG_STEPS + 2) * k * k * d2) / rates.matmul64
    return svd + iters * iteration + refine * rounds


def stage_seconds(plan, cfg, hidden: int, input_dims: dict[str, int], rates: Rates,
                  output_bytes: int) -> dict[str, float]:
    """Expected seconds per stage of the whole run."""
    from ..stages.solvers import default_iters

    tokens = cfg.calib_samples * cfg.seq_len
    layers = plan.num_layers
    block_flops = sum(2 * m.d1 * m.d2 * m.members * m.count for m in plan.matrices) / layers
    capture = layers * tokens * (block_flops + 4 * cfg.seq_len * hidden) / rates.matmul_compute
    grams = layers * sum(2 * tokens * d * d for d in input_dims.values()) / rates.matmul64
    cholesky = plan.groups * sum(d**3 / 3 for d in input_dims.values()) / rates.cholesky64
    whiten = sum(m.count * (2 * m.d1 * m.d1 * m.d2 * m.members
                            + m.d1 * m.d1 * (m.k or m.r or 0)) for m in plan.matrices)
    iters = cfg.iters if cfg.iters is not None else default_iters(cfg.solver)
    if cfg.method == "masa":  # per member an SVD and SVD-LLM's reference spectrum, per S tried
        solve = sum(m.count * m.members * 2 * (m.members if cfg.masa_atoms == "auto" else 1)
                    * min(m.d1, m.d2) ** 2 * max(m.d1, m.d2) / rates.svd64
                    for m in plan.matrices)
    else:
        solve = sum(m.count * solve_seconds(m.d1, m.d2 * m.members, m.k, m.s, m.r,
                                            cfg.solver, iters, cfg.refine_iters,
                                            cfg.power_iters, rates)
                    for m in plan.matrices)
    return {"capture": capture, "grams": grams,
            "whitening": cholesky + whiten / rates.matmul64, "solve": solve,
            "assembly": output_bytes / rates.disk_write}


def format_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
