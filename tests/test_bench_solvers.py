"""tools/bench_solvers.py on one tiny shape: the row it reports is complete and consistent.

Speed is not asserted (benchmarks print it); what is asserted could be wrong in the code:
our OMP agrees with sklearn, gOMP's and exact OMP's coding errors are relative errors, the
design's ceilings order as they must (b x fewer dense FLOPs can only raise the ceiling),
and the peak is measured above the entry level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

pytest.importorskip("sklearn")  # the reference is in the test extra; CI installs it

import bench_solvers  # noqa: E402


def test_bench_row_on_a_tiny_shape():
    args = argparse.Namespace(dtype="float64", ratio=0.3, rho=2.0, power_iters=2,
                              max_columns=96, sklearn_columns=32, atoms_per_step=1,
                              gomp_atoms_per_step=4)
    device = torch.device("cpu")
    rate = bench_solvers.matmul_rate(device, torch.float64, n=256)
    row = bench_solvers.bench_shape(48, 96, args, device, rate)

    assert row["omp_matches_sklearn"] is True
    assert row["columns_used"] == 96 and row["sklearn_columns"] == 32
    # Relative errors of s-sparse codes over a dictionary drawn from the matrix's own
    # columns: some columns are coded exactly, none is coded worse than by zero.
    assert 0.0 < row["omp_coding_error"] < 1.0
    assert 0.0 < row["gomp_coding_error"] < 1.0
    assert row["ceiling_fraction_gomp"] > row["ceiling_fraction_exact"] > 0.0
    assert row["ceiling_omp_speedup_vs_sklearn"] > 0.0
    assert row["matvec_gflop_rate"] > 0.0
    assert row["peak_bytes"] >= 0
    for key in ("omp_speedup_vs_sklearn", "gomp_speedup_vs_sklearn", "ksvd_iter_seconds",
                "matmul_fraction"):
        assert row[key] > 0.0, key


def test_quality_row_records_wall_and_cpu_seconds():
    """--quality rows carry each solver's wall and process-CPU seconds and the ratios of
    both (the CPU ratio is the one contention on a shared machine distorts least)."""
    args = argparse.Namespace(ratio=0.3, rho=2.0, closed_iters=3, refine_iters=2,
                              no_gomp=True, gomp_atoms_per_step=4, ksvd_max_elements=10**6,
                              ksvd_iters=2)
    matrix = torch.randn(24, 48, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    row = bench_solvers.quality_row("tiny", matrix, args, torch.device("cpu"))
    for name in ("svd", "closed", "ksvd"):
        assert row[f"{name}_seconds"] > 0.0 and row[f"{name}_cpu_seconds"] > 0.0, name
    assert row["ksvd_over_closed_cpu"] == pytest.approx(
        row["ksvd_cpu_seconds"] / row["closed_cpu_seconds"])
    assert "gomp_seconds" not in row  # --no-gomp
    # relative errors of a rank-reducing factorisation: strictly between 0 and 1
    for key in ("svd_llm_error", "closed_error", "ksvd_error"):
        assert 0.0 < row[key] < 1.0, key
    summary = bench_solvers.quality_summary([row])
    assert "in CPU seconds" in summary[1]
