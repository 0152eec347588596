"""The closed-form dictionary solver (``--solver closed``) and its place in the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from test_solvers import functional_error, generator, union_of_subspaces
from tiny_models import calib_text, make_model

from cospadi.pipeline.cli import main
from cospadi.pipeline.compress import preflight
from cospadi.pipeline.config import make_config
from cospadi.pipeline.plan import make_plan
from cospadi.stages.factorize import SolverSettings, factorize_layer
from cospadi.stages.sizing import dictionary_shape, svd_rank
from cospadi.stages.solver_closed import codes_on_support, solve_closed
from cospadi.stages.supports import top_s

F64 = torch.float64


def spectrum_matrix(d1: int, d2: int, seed: int, decay: float = 2.0) -> torch.Tensor:
    """Random singular vectors with a decaying spectrum, like a whitened weight."""
    gen = generator(seed)
    left = torch.linalg.qr(torch.randn(d1, d1, generator=gen, dtype=F64)).Q
    right = torch.randn(d1, d2, generator=gen, dtype=F64)
    return (left * torch.logspace(0, -decay, d1, dtype=F64)) @ right


def actual_error(matrix: torch.Tensor, solution) -> float:
    k = solution.dictionary.shape[1]
    codes = torch.zeros(k, matrix.shape[1], dtype=F64).scatter_(0, solution.support,
                                                                  solution.values)
    return ((matrix - solution.dictionary @ codes).norm() / matrix.norm()).item()


CASES = {  # name: (matrix, ratio); "wide" and "wider" have k > d1
    "random": (lambda: torch.randn(48, 96, generator=generator(1), dtype=F64), 0.3),
    "spectrum": (lambda: spectrum_matrix(64, 160, seed=2), 0.3),
    "tall": (lambda: spectrum_matrix(96, 40, seed=3)[:96, :40], 0.4),
    "union": (lambda: union_of_subspaces(32, 256, 8, 4, seed=4), 0.3),
    "wide": (lambda: torch.randn(16, 400, generator=generator(5), dtype=F64), 0.2),
    "wider": (lambda: spectrum_matrix(8, 600, seed=6), 0.2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_never_worse_than_its_warm_start(name):
    make, ratio = CASES[name]
    matrix = make()
    d1, d2 = matrix.shape
    shape = dictionary_shape(d1, d2, ratio, 2.0)
    solution = solve_closed(matrix, shape.k, shape.s, svd_rank=svd_rank(d1, d2, ratio).r)
    stats = solution.stats
    errors = stats["errors"]
    # Every step solves its subproblem exactly (thresholding, Procrustes, least squares) or
    # is kept per column only where it lowers the error: a rise would be float64 rounding
    # of the ~1e-16-relative energies involved, so 1e-10 bounds it with a wide margin.
    assert all(b <= a * (1 + 1e-10) + 1e-14 for a, b in zip(errors, errors[1:], strict=False))
    assert stats["error"] <= stats["warm_error"] * (1 + 1e-10)
    # the recorded error is the factors' true error (what inspect shows)
    assert actual_error(matrix, solution) == pytest.approx(stats["error"], rel=1e-8, abs=1e-12)
    # the format: k atoms, exactly s distinct ascending atoms per column
    assert solution.dictionary.shape == (d1, shape.k)
    assert solution.support.shape == (shape.s, d2)
    assert (solution.support.diff(dim=0) > 0).all()
    assert torch.isfinite(solution.dictionary).all() and torch.isfinite(solution.values).all()
    # and it beats SVD-LLM at the same budget on these (spread-spectrum) matrices
    assert stats["error"] < stats["svd_llm_error"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_solve_is_never_worse_than_its_warm_start(name):
    """The pipeline's precision. The rounds' keep-or-not decisions use per-column energies
    from k-space products (``||x||^2 - 2 c.D^T x + c.D^T D c``), so a float32 rounding
    can keep a column that is worse by rounding; the result must still not rise above
    the warm start, and the recorded error must be the factors' float64 error."""
    make, ratio = CASES[name]
    matrix = make()
    d1, d2 = matrix.shape
    shape = dictionary_shape(d1, d2, ratio, 2.0)
    stats = (solution := solve_closed(matrix, shape.k, shape.s, dtype=torch.float32)).stats
    assert actual_error(matrix, solution) == pytest.approx(stats["error"], rel=1e-8,
                                                           abs=1e-12)
    # the rounds' tracked errors (the last entry is the float64 one) only fall: each keeps
    # a dictionary or a column's codes only where its own energy sum is lower
    rounds = stats["errors"][-stats["refine_rounds"] - 2:-1]
    assert all(b <= a for a, b in zip(rounds, rounds[1:], strict=False))
    # float32 energies are off by ~1e-7 of ||x||^2 (k-term sums; 1e-6 with margin), an
    # error e by that over 2 e: on "wider" (e ~ 0.011) the tracked 0.0112616 is 0.0112635
    # in float64, within the bound 4.5e-5
    assert stats["error"] <= stats["warm_error"] + 1e-6 / (2 * stats["warm_error"])


def test_k_larger_than_d1_uses_the_extra_atoms():
    """k > d1: an orthonormal dictionary holds only d1 atoms. The extra atoms must be used
    and pay: the error drops below the orthonormal d1-atom stage."""
    matrix = torch.randn(16, 400, generator=generator(7), dtype=F64)
    shape = dictionary_shape(16, 400, 0.2, 2.0)
    assert shape.k > 16
    solution = solve_closed(matrix, shape.k, shape.s)
    used = torch.zeros(shape.k, dtype=torch.bool)
    used[solution.support.flatten()] = True
    assert used[16:].any()
    alternation = solution.stats["errors"][solution.stats["alternation_iters"]]
    # measured ~8 % lower; a broken extension (extras unused or refits rejected) gives 0 %
    assert solution.stats["error"] < 0.97 * alternation


def test_refinement_stops_when_a_round_gains_little():
    """The least-squares rounds run until one gains less than ``tol`` of the error: on a
    spread spectrum 20 rounds keep paying at tol 0 (each lowers the error), a loose tol
    stops after the first round that gains less."""
    matrix = spectrum_matrix(64, 160, seed=13, decay=0.5)
    shape = dictionary_shape(64, 160, 0.3, 2.0)
    full = solve_closed(matrix, shape.k, shape.s, refine=20, tol=0.0).stats
    assert full["refine_rounds"] == 20
    rounds = full["errors"][-20:]
    assert rounds[-1] < rounds[0]
    loose = solve_closed(matrix, shape.k, shape.s, refine=20, tol=0.05).stats
    # rounds gain 7 %, then 2 % here: it stops after the first round below 5 %
    count = loose["refine_rounds"]
    assert 1 <= count < 20
    errors = loose["errors"][-count - 1:]
    gains = [1 - b / a for a, b in zip(errors, errors[1:], strict=False)]
    assert gains[-1] < 0.05 and all(g >= 0.05 for g in gains[:-1])
    assert loose["error"] >= full["error"]


def test_exact_recovery_of_a_planted_orthonormal_dictionary():
    """W = D0 S0 with D0 orthonormal (k <= d1) and s-sparse codes: the solver must reach
    W exactly (float64 rounding) and find every planted atom."""
    d1, k, s, n = 40, 24, 4, 600
    gen = generator(8)
    atoms = torch.linalg.qr(torch.randn(d1, k, generator=gen, dtype=F64)).Q
    support = torch.rand(k, n, generator=gen).argsort(dim=0)[:s]
    values = (1 + torch.rand(s, n, generator=gen, dtype=F64)) * torch.randn(
        s, n, generator=gen, dtype=F64).sign()
    codes = torch.zeros(k, n, dtype=F64).scatter_(0, support, values)
    matrix = atoms @ codes
    solution = solve_closed(matrix, k, s, iters=50)
    assert solution.stats["error"] < 1e-8
    matched = (solution.dictionary.T @ atoms).abs().max(dim=0).values
    assert (matched > 1 - 1e-8).all()


@pytest.mark.parametrize("kind", ["few tokens", "dead feature", "indefinite"])
def test_singular_grams_give_a_sane_result(kind):
    gen = generator(9)
    # 20 tokens < d1 = 32: a rank-20 Gram. (With fewer tokens than SVD-LLM's rank, 13
    # here, the whitened matrix is exactly low rank and SVD-LLM is exact: nothing to beat.)
    x = torch.randn(20 if kind == "few tokens" else 200, 32, generator=gen, dtype=F64)
    if kind == "dead feature":
        x[:, 4] = 0.0
    gram = x.T @ x
    if kind == "indefinite":
        gram = gram - 2 * torch.linalg.eigvalsh(gram)[0] * torch.eye(32, dtype=F64)
    weight = torch.randn(32, 48, generator=gen, dtype=F64)
    result = factorize_layer(weight, gram, SolverSettings(ratio=0.3))
    assert result.whitening_path != "cholesky"
    assert torch.isfinite(result.factors[0].dense()).all()
    assert result.stats["error"] < result.stats["svd_llm_error"]
    assert result.stats["solver"] == "closed"


def test_beats_svd_llm_clearly_on_union_of_subspaces():
    d1, d2 = 32, 256
    weight = union_of_subspaces(d1, d2, n_subspaces=8, dim=4, seed=20)
    x = torch.randn(400, d1, generator=generator(21), dtype=F64) * torch.linspace(
        0.2, 3, d1, dtype=F64)
    result = factorize_layer(weight, x.T @ x, SolverSettings(ratio=0.3))
    err = functional_error(x, weight, result.factors[0].dense().double())
    svd = result.stats["svd_llm_error"]
    # 36 atoms with 18 per column can hold every 4-dim subspace, rank 19 cannot: measured
    # 0.032 against 0.141 (4.4x; the warm start alone is 2x); demand 3x, as of K-SVD
    assert err < svd / 3, (err, svd)
    # the diagnostic is the functional error itself (factors stored in float32)
    assert err == pytest.approx(result.stats["error"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("support,d1", [("2:4", 48), ("block8", 48), ("block8", 32)])
def test_structured_supports_keep_their_structure_and_beat_the_coder(support, d1):
    """--support 2:4 / block<B> through the closed solver: the stored supports honour the
    structure (also with k > d1, block8 at d1 = 32: k = 36), and the alternation and
    refinement beat their warm start, the exact coder of the orthonormal dictionary (what
    K-SVD runs get), on a matrix with subspace structure."""
    from cospadi.stages import supports

    weight = union_of_subspaces(d1, 256, n_subspaces=8, dim=4, seed=22)
    x = torch.randn(400, d1, generator=generator(23), dtype=F64) * torch.linspace(
        0.2, 3, d1, dtype=F64)
    closed = factorize_layer(weight, x.T @ x, SolverSettings(ratio=0.3, support=support))
    factors = closed.factors[0]
    assert factors.structure == support and closed.stats["solver"] == "closed"
    assert supports.honours(factors.support, factors.k, supports.parse_support(support))
    err = functional_error(x, weight, factors.dense().double())
    # the warm start's error is the orthonormal coder's; measured gains 25-66 % (2:4
    # 0.030 vs 0.089, block8 0.077 vs 0.105 and 0.104 vs 0.130): demand 15 %
    assert err < 0.85 * closed.stats["warm_error"], (err, closed.stats["warm_error"])
    if factors.k <= d1:  # the coder itself (it needs k <= d1) is that warm start
        coder = factorize_layer(weight, x.T @ x, SolverSettings(
            ratio=0.3, support=support, solver="ksvd"))
        assert coder.stats["error"] == pytest.approx(closed.stats["warm_error"], rel=1e-5)


def test_code_refit_matches_a_direct_solve():
    gen = generator(10)
    dictionary = torch.randn(20, 30, generator=gen, dtype=F64)
    dictionary /= dictionary.norm(dim=0)
    signals = torch.randn(20, 50, generator=gen, dtype=F64)
    support = top_s(torch.rand(30, 50, generator=gen, dtype=F64), 6)
    start = torch.zeros(30, 50, dtype=F64).scatter_(0, support, 1.0)
    refit = codes_on_support(dictionary.T @ dictionary, dictionary.T @ signals, start,
                             steps=6)
    for j in range(50):
        atoms = dictionary[:, support[:, j]]
        exact = torch.linalg.lstsq(atoms, signals[:, j:j + 1]).solution[:, 0]
        # CG on a 6 x 6 system converges in 6 steps up to rounding
        assert torch.allclose(refit[support[:, j], j], exact, atol=1e-8)
    assert (refit.ne(0).sum(dim=0) <= 6).all()


def test_free_support_rule_and_settings_checks():
    gains = torch.tensor([[3.0, 0.0], [1.0, 5.0], [2.0, 4.0]])
    assert sorted(map(sorted, top_s(gains, 2).T.tolist())) == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="support must be"):
        SolverSettings(support="nope")
    with pytest.raises(ValueError, match="solver must be one of"):
        SolverSettings(solver="fast")


@pytest.mark.parametrize("group_size", [1, 2])
def test_pipeline_bytes_match_the_plan_and_inspect_shows_errors(tmp_path, capsys, group_size):
    model = make_model(tmp_path / "model", "llama", layers=2)
    text = calib_text(tmp_path / "calib.txt")
    out = tmp_path / "out"
    args = ["--model", str(model), "--out", str(out), "--calib-text", str(text),
            "--calib-samples", "4", "--seq-len", "32", "--ratio", "0.3",
            "--group-size", str(group_size)]
    assert main(["-q", "compress", *args]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cfg = make_config(None, {"model": str(model), "out": str(out), "calib_text": str(text),
                             "calib_samples": 4, "seq_len": 32, "ratio": 0.3,
                             "group_size": group_size})
    _, skeleton, reader = preflight(cfg)
    plan = make_plan(cfg, skeleton, reader)
    planned = sum(m.bytes * m.count for m in plan.matrices)
    assert report["compressed"]["bytes"] == planned
    for name, module in report["modules"].items():
        figures = module["diagnostics"]
        assert 0 < figures["error"] < 0.25 and 0 < figures["svd_llm_error"] <= 1, name
        # Block 0's q, k, v read embeddings of 128 tokens of a few distinct bytes: a
        # singular Gram (shifted Cholesky), so the whitened matrix is of lower rank than
        # SVD-LLM's and the low-rank format is exact there (K-SVD loses too). Elsewhere the
        # dictionary must win.
        if ".layers.0.self_attn." not in name or name.endswith("o_proj"):
            assert figures["error"] < figures["svd_llm_error"], name
    assert main(["inspect", str(out)]) == 0
    assert "SVD-LLM" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Same code on CUDA: the same errors as on the CPU (float64 throughout here, so only
    summation order differs: 1e-6 relative bounds it)."""
    matrix = spectrum_matrix(64, 160, seed=11)
    shape = dictionary_shape(64, 160, 0.3, 2.0)
    cpu = solve_closed(matrix, shape.k, shape.s)
    gpu = solve_closed(matrix.cuda(), shape.k, shape.s)
    assert gpu.dictionary.is_cuda
    assert gpu.stats["error"] == pytest.approx(cpu.stats["error"], rel=1e-6)
    wide = torch.randn(16, 400, generator=generator(12), dtype=F64)
    wide_shape = dictionary_shape(16, 400, 0.2, 2.0)
    assert solve_closed(wide.cuda(), wide_shape.k, wide_shape.s).stats["error"] == \
        pytest.approx(solve_closed(wide, wide_shape.k, wide_shape.s).stats["error"], rel=1e-6)


def test_bench_scale_plan_of_a_70b():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_scale

    assert bench_scale.widths(1.0) == {"hidden": 8192, "intermediate": 28672, "heads": 64,
                                       "kv_heads": 8}
    cfg = make_config(None, {"ratio": 0.3})
    plan = bench_scale.model_plan(cfg, bench_scale.widths(1.0), 80)
    assert sum(m.count for m in plan.matrices) == 7 * 80
    assert plan.kept_params == pytest.approx(0.7, abs=0.002)
    h100 = bench_scale.stage_groups(bench_scale.stage_seconds(
        plan, cfg, plan.hidden, plan.input_dims, bench_scale.H100, 0))
    # the closed solver's FLOPs on an H100 at the stated rates: well under the 2 h goal,
    # and a ksvd plan at 60 iterations is orders of magnitude more
    assert 0 < h100["factor"] < 2 * 3600
    ksvd = make_config(None, {"ratio": 0.3, "solver": "ksvd"})
    slow = bench_scale.stage_groups(bench_scale.stage_seconds(
        bench_scale.model_plan(ksvd, bench_scale.widths(1.0), 80), ksvd, plan.hidden,
        plan.input_dims, bench_scale.H100, 0))
    assert slow["factor"] > 100 * h100["factor"]
