"""Benchmark the solvers: Batch-OMP against scikit-learn, one K-SVD iteration, memory.

For each matrix shape (SmolLM2-135M and Llama-3-8B projections) at the given ratio and rho:

- OMP time against ``sklearn.linear_model.orthogonal_mp_gram`` on the same problem
  (sklearn in float64, the precision it works in; ours in the working dtype and float64);
- one K-SVD iteration: seconds, the OMP / dictionary-update split, and the achieved rate of
  useful FLOPs (counted as the issue specifies: ``k s^2 / 2 + s^3 / 3`` per column for
  Batch-OMP, ``2 (2p + 1) d1 s d2`` for the atom sweep) against this machine's own dense
  matmul rate in the same dtype, measured in the same run;
- peak memory of one K-SVD iteration against the size of the matrix;
- gOMP (b atoms per step) on the same problem: its speed against sklearn and its coding
  error over exact OMP's (what the speed costs);
- the ceiling of this design: the matmul fraction one iteration would reach if everything
  but the dense correlation update of OMP (2 k^2 s FLOPs per column, b x fewer for gOMP)
  and the atom sweep's matrix-vector products ran free, at the rates measured here.

Large shapes code a subset of the columns (``--max-columns``; the dictionary keeps its full
k atoms) and sklearn runs on fewer still (``--sklearn-columns``); per-column times are
scaled to the same column count, and every row says what it used.

    python tools/bench_solvers.py [--device cuda] [--json] [--shapes smollm2|llama3|all]
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram  # the reference (test extra)

from cospadi.stages.ksvd import initial_dictionary, update_atoms
from cospadi.stages.omp import batch_omp
from cospadi.stages.sizing import dictionary_shape

SHAPES = {
    "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "llama3": [(4096, 4096), (4096, 14336)],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    fn()  # warm-up (allocator, kernels)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=5)
    return 2 * n**3 / seconds


def test_matrix(d1: int, d2: int, seed: int, dtype: torch.dtype, device: torch.device):
    """A whitened-weight-like matrix: random with a decaying spectrum, like R W."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(d1, d1, generator=gen)
    scales = torch.logspace(0, -2, d1)
    return ((left * scales) @ torch.randn(d1, d2, generator=gen) / d1**0.5).to(device, dtype)


def _release_freed_memory() -> None:
    """Hand memory freed by earlier phases back to the OS (glibc keeps it resident), so the
    peak above the entry level counts this phase's memory, not what it reuses."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms by a thread
    (ru_maxrss is a lifetime maximum, useless after a larger earlier step)."""

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        _release_freed_memory()
        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def bench_shape(d1: int, d2: int, args, device: torch.device, rate: float) -> dict:
    dtype = getattr(torch, args.dtype)
    shape = dictionary_shape(d1, d2, args.ratio, args.rho)
    k, s = shape.k, shape.s
    columns = min(d2, args.max_columns)
    full = test_matrix(d1, d2, 0, dtype, device)
    dictionary = initial_dictionary(full, k, seed=42)
    matrix = full[:, :columns].contiguous()
    gram, corr = dictionary.T @ dictionary, dictionary.T @ matrix

    # --- OMP against sklearn -------------------------------------------------------------
    sk_cols = min(columns, args.sklearn_columns)
    gram64 = gram.double().cpu().numpy()
    corr64 = corr[:, :sk_cols].double().cpu().numpy()
    t0 = time.perf_counter()
    reference = orthogonal_mp_gram(gram64, corr64, n_nonzero_coefs=s)
    sklearn_per_column = (time.perf_counter() - t0) / sk_cols
    omp_flops = columns * (k * s * s / 2 + s**3 / 3)
    update_flops = 2 * (2 * args.power_iters + 1) * d1 * s * columns
    ours = timed(lambda: batch_omp(gram, corr, s), device)
    ours64 = timed(lambda: batch_omp(gram.double(), corr.double(), s), device)
    check = batch_omp(gram.double(), corr[:, :sk_cols].double(), s).dense(k).cpu().numpy()
    omp_agrees = bool(np.allclose(check, reference, atol=1e-6 * max(1, np.abs(reference).max())))

    # --- gOMP on the same problem: its speed, and what it costs in coding error -----------
    b = args.gomp_atoms_per_step
    ours_gomp = timed(lambda: batch_omp(gram, corr, s, atoms_per_step=b), device)
    matrix_norm = matrix.norm()

    def coding_error(atoms_per_step: int) -> float:
        codes = batch_omp(gram, corr, s, atoms_per_step=atoms_per_step).dense(k)
        return float((matrix - dictionary @ codes).norm() / matrix_norm)

    exact_error, gomp_error = coding_error(1), coding_error(b)

    # --- ceilings of this design on this machine -----------------------------------------
    # The exact OMP's correlation update is one dense N x k @ k x k matmul per step
    # (2 k^2 s FLOPs per column, b x fewer with gOMP); the atom sweep is sequential
    # rank-1 updates, i.e. matrix-vector products on an atom's users x d1 residual. Even
    # with everything else free, an iteration cannot beat these two rates.
    users = max(1, round(columns * s / k))
    restricted = torch.randn(users, d1, device=device, dtype=dtype)
    vector = torch.randn(d1, device=device, dtype=dtype)
    matvec_seconds = timed(lambda: restricted.T @ (restricted @ vector), device, repeats=50)
    matvec_rate = 4 * users * d1 / matvec_seconds

    def ceiling(atoms_per_step: int) -> float:
        dense_flops = columns * 2 * k * k * s / atoms_per_step
        best_seconds = dense_flops / rate + update_flops / matvec_rate
        return (omp_flops + update_flops) / best_seconds / rate

    # --- one K-SVD iteration -------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_device = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        sync(device)
        t0 = time.perf_counter()
        codes = batch_omp(gram, corr, s, atoms_per_step=args.atoms_per_step).dense(k)
        residual = matrix - dictionary @ codes
        sync(device)
        t1 = time.perf_counter()
        update_atoms(dictionary.clone(), codes, residual, args.power_iters)
        sync(device)
        t2 = time.perf_counter()
    omp_seconds, update_seconds = t1 - t0, t2 - t1
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_device
    else:
        peak = rss.above_base

    iteration = omp_seconds + update_seconds
    return {
        "shape": [d1, d2],
        "columns_used": columns,
        "sklearn_columns": sk_cols,
        "k": k,
        "s": s,
        "dtype": args.dtype,
        "atoms_per_step": args.atoms_per_step,
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "sklearn_seconds_per_column": sklearn_per_column,
        "omp_seconds_per_column": ours / columns,
        "omp_speedup_vs_sklearn": sklearn_per_column / (ours / columns),
        "omp_float64_speedup_vs_sklearn": sklearn_per_column / (ours64 / columns),
        "omp_matches_sklearn": omp_agrees,
        "gomp_atoms_per_step": b,
        "gomp_speedup_vs_sklearn": sklearn_per_column / (ours_gomp / columns),
        "omp_coding_error": exact_error,
        "gomp_coding_error": gomp_error,
        "matvec_gflop_rate": matvec_rate / 1e9,
        "ceiling_fraction_exact": ceiling(1),
        "ceiling_fraction_gomp": ceiling(b),
        "ceiling_omp_speedup_vs_sklearn": sklearn_per_column * columns * rate
        / (columns * 2 * k * k * s),
        "ksvd_iter_seconds": iteration,
        "ksvd_iter_seconds_all_columns": iteration * d2 / columns,
        "omp_share": omp_seconds / iteration,
        "useful_gflops": (omp_flops + update_flops) / 1e9,
        "achieved_gflop_rate": (omp_flops + update_flops) / iteration / 1e9,
        "matmul_gflop_rate": rate / 1e9,
        "matmul_fraction": (omp_flops + update_flops) / iteration / rate,
        "omp_matmul_fraction": omp_flops / omp_seconds / rate,
        "update_matmul_fraction": update_flops / update_seconds / rate,
        "peak_bytes": int(peak),
        "matrix_bytes": d1 * columns * torch.finfo(dtype).bits // 8,
        "peak_over_matrix": peak / (d1 * columns * torch.finfo(dtype).bits / 8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--power-iters", type=int, default=8)
    parser.add_argument("--shapes", default="all", choices=["smollm2", "llama3", "all"])
    parser.add_argument("--max-columns", type=int, default=None,
                        help="columns coded per shape (default: all on GPU; 1536 / 128 on CPU)")
    parser.add_argument("--sklearn-columns", type=int, default=None)
    parser.add_argument("--atoms-per-step", type=int, default=1,
                        help="OMP atoms per step in the K-SVD iteration (1 = exact OMP)")
    parser.add_argument("--gomp-atoms-per-step", type=int, default=8,
                        help="b of the gOMP run compared with sklearn and exact OMP")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for sklearn's BLAS (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(device, dtype)
    shapes = SHAPES["smollm2"] + SHAPES["llama3"] if args.shapes == "all" else SHAPES[args.shapes]
    rows = []
    for d1, d2 in shapes:
        big = d1 * d2 > 4_000_000
        local = argparse.Namespace(**vars(args))
        if local.max_columns is None:
            local.max_columns = 10**9 if device.type == "cuda" else (96 if big else 1536)
        if local.sklearn_columns is None:
            local.sklearn_columns = 16 if big else 256
        rows.append(bench_shape(d1, d2, local, device, rate))
        print_row(rows[-1], header=len(rows) == 1, stream=sys.stderr if args.json else sys.stdout)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    return 0


def print_row(row: dict, header: bool, stream=sys.stdout) -> None:
    print = functools.partial(builtins.print, file=stream)  # noqa: A001
    if header:
        print(f"device {row['device']} ({row['threads']} threads), dtype {row['dtype']}, "
              f"dense matmul {row['matmul_gflop_rate']:.0f} GFLOP/s; gOMP b = "
              f"{row['gomp_atoms_per_step']}, 'gOMP err' = its coding error over exact "
              f"OMP's; 'ceil' = best frac this design allows (dense OMP step and sweep "
              f"matvecs at their measured rates, all else free)")
        print(f"{'shape':>12} {'cols':>6} {'k':>5} {'s':>5} {'omp x sk':>9} {'f64 x sk':>9} "
              f"{'iter s':>8} {'iter s(all)':>11} {'omp %':>6} {'frac':>6} {'omp fr':>7} "
              f"{'upd fr':>7} {'peak/W':>7} {'gOMP x sk':>9} {'gOMP err':>9} {'ceil ex':>7} "
              f"{'ceil g':>6}")
    shape = f"{row['shape'][0]}x{row['shape'][1]}"
    print(f"{shape:>12} {row['columns_used']:>6} {row['k']:>5} {row['s']:>5} "
          f"{row['omp_speedup_vs_sklearn']:>9.1f} {row['omp_float64_speedup_vs_sklearn']:>9.1f} "
          f"{row['ksvd_iter_seconds']:>8.3f} {row['ksvd_iter_seconds_all_columns']:>11.2f} "
          f"{100 * row['omp_share']:>6.1f} {row['matmul_fraction']:>6.3f} "
          f"{row['omp_matmul_fraction']:>7.3f} {row['update_matmul_fraction']:>7.3f} "
          f"{row['peak_over_matrix']:>7.1f} {row['gomp_speedup_vs_sklearn']:>9.1f} "
          f"{row['gomp_coding_error'] / max(row['omp_coding_error'], 1e-30):>9.3f} "
          f"{row['ceiling_fraction_exact']:>7.3f} {row['ceiling_fraction_gomp']:>6.3f}",
          flush=True)

if __name__ == "__main__":
    raise SystemExit(main())
