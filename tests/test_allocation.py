"""Global budget allocation: the knapsack, the curves, the proxy, and a pipeline run."""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import calib_text, make_model
from transformers import AutoModelForCausalLM

from cospadi.pipeline.cli import main
from cospadi.stages.allocated import factorize_option
from cospadi.stages.allocation import AllocationError, allocate, lower_hull
from cospadi.stages.budget_plan import UniformSpec, plan_budgets, uniform_index
from cospadi.stages.curves import unit_curve
from cospadi.stages.factorize import SolverSettings
from cospadi.stages.whitening import whitening_from_gram


def random_curves(rng: random.Random, units: int, options: int) -> list[list[tuple[int, float]]]:
    """Decreasing-error options at random byte sizes, with some non-convex kinks and
    dominated points (the allocator must cope with both)."""
    curves = []
    for _ in range(units):
        sizes = sorted(rng.sample(range(10, 2000), options))
        error, opts = rng.uniform(1, 10), []
        for size in sizes:
            error *= rng.uniform(0.5, 1.05)  # mostly decreasing, sometimes not
            opts.append((size, error))
        curves.append(opts)
    return curves


def brute_force(curves: list[list[tuple[int, float]]], budget: int) -> float:
    best = float("inf")
    for choice in itertools.product(*[range(len(c)) for c in curves]):
        if sum(c[i][0] for c, i in zip(curves, choice, strict=True)) <= budget:
            best = min(best, sum(c[i][1] for c, i in zip(curves, choice, strict=True)))
    return best


def test_budget_met_and_gap_bounds_true_optimum():
    rng = random.Random(0)
    for trial in range(40):
        curves = random_curves(rng, units=4, options=5)
        floor = sum(min(o[0] for o in c) for c in curves)
        top = sum(max(o[0] for o in c) for c in curves)
        budget = rng.randint(floor, top)
        result = allocate(curves, budget)
        chosen = [c[i] for c, i in zip(curves, result.choice, strict=True)]
        assert result.bytes == sum(o[0] for o in chosen) <= budget
        assert result.value == pytest.approx(sum(o[1] for o in chosen))
        optimum = brute_force(curves, budget)
        # the dual bound is a true lower bound and the stated gap covers the real one
        assert result.lower_bound <= optimum + 1e-9, trial
        assert result.value - optimum <= result.gap + 1e-9, trial
        # the fill leaves no single change that fits and lowers the proxy
        for unit, c in enumerate(curves):
            current = c[result.choice[unit]]
            for size, error in c:
                if size - current[0] <= result.slack:
                    assert error >= current[1] - 1e-12


def test_budget_met_exactly_on_fine_ladders():
    """With every size available in small steps (as SVD ranks are), the allocation spends
    the budget to within one step of the smallest unit."""
    rng = random.Random(1)
    for _ in range(10):
        curves = []
        for _ in range(30):
            step = rng.randint(20, 60)
            decay = rng.uniform(0.8, 0.99)
            curves.append([(step * r, decay ** r) for r in range(1, 80)])
        budget = rng.randint(30 * 80, 30 * 40 * 60)
        result = allocate(curves, budget)
        assert 0 <= result.slack < 60
        assert result.gap <= 0.01 * result.value + 1e-12


def test_never_worse_than_uniform_on_its_proxy():
    rng = random.Random(2)
    for _ in range(40):
        curves = random_curves(rng, units=12, options=8)
        reference = [rng.randrange(8) for _ in curves]
        budget = sum(c[i][0] for c, i in zip(curves, reference, strict=True))
        result = allocate(curves, budget, reference=reference)
        assert result.bytes <= budget
        assert result.value <= sum(c[i][1] for c, i in zip(curves, reference, strict=True)) + 1e-12


def test_budget_below_cheapest_is_an_error():
    with pytest.raises(AllocationError, match="below"):
        allocate([[(10, 1.0), (20, 0.5)], [(10, 1.0)]], 19)


def test_lower_hull_drops_dominated_and_concave_points():
    costs = [1, 2, 3, 4, 5]
    errors = [10.0, 9.5, 5.0, 6.0, 1.0]  # 2 lies above the chord 1 -> 3; 4 is dominated
    assert lower_hull(costs, errors) == [0, 2, 4]


def synthetic(kind: str, d1: int = 48, d2: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "easy":  # nearly rank 3
        return torch.randn(d1, 3, generator=g, dtype=torch.float64) @ \
            torch.randn(3, d2, generator=g, dtype=torch.float64) + \
            1e-3 * torch.randn(d1, d2, generator=g, dtype=torch.float64)
    return torch.randn(d1, d2, generator=g, dtype=torch.float64)  # flat spectrum: hard


def test_moves_budget_from_the_easy_to_the_hard_matrix():
    spec = UniformSpec("cospadi", 0.5, 2.0)
    curves = []
    for index, kind in enumerate(("easy", "hard")):
        w = synthetic(kind, seed=index)
        shape = spec.option_of(*w.shape)
        curves.append(unit_curve("mlp.up_proj", (index,), w, extra=((shape[2], shape[3]),)))
    plan = plan_budgets(curves, spec, "params")
    easy, hard = plan.chosen(0), plan.chosen(1)
    uniform_easy = curves[0].options[plan.uniform[0]]
    uniform_hard = curves[1].options[plan.uniform[1]]
    assert plan.allocation.bytes <= uniform_easy.bytes + uniform_hard.bytes
    assert hard.bytes > uniform_hard.bytes and easy.bytes < uniform_easy.bytes
    # the easy matrix stays nearly exact; the hard one gains a lot
    assert easy.error < 1e-4
    assert hard.error < 0.8 * uniform_hard.error
    assert plan.allocation.value < 0.6 * plan.uniform_value


def _easy_hard_curves(spec, layers) -> list:
    """Curves of four up_proj matrices, easy / hard / hard / easy; ``layers(i)``: unit i's."""
    curves = []
    for index, kind in enumerate(("easy", "hard", "hard", "easy")):
        w = synthetic(kind, seed=index)
        _, _, k, s, _ = spec.option_of(*w.shape)
        curves.append(unit_curve("mlp.up_proj", layers(index), w, extra=((k, s),)))
    return curves


def test_block_scope_keeps_every_block_within_its_uniform_bytes():
    spec = UniformSpec("cospadi", 0.5, 2.0)
    curves = _easy_hard_curves(spec, lambda layer: (layer // 2,))
    parts = [c.layers[0] for c in curves]
    free = plan_budgets(curves, spec, "params")
    block = plan_budgets(curves, spec, "params", parts)
    for part in (0, 1):
        units = [u for u, p in enumerate(parts) if p == part]
        assert sum(block.chosen(u).bytes for u in units) <= \
            sum(curves[u].options[block.uniform[u]].bytes for u in units)
    # a constrained allocation: never better than the free one, never worse than uniform
    assert free.allocation.value <= block.allocation.value + 1e-12
    assert block.allocation.value <= block.uniform_value
    assert block.allocation.lower_bound <= block.allocation.value + 1e-12


def test_proxy_is_the_weighted_mean_relative_error():
    """The proxy of an assignment is sum_i w_i e_i with w_i normalised to sum 1: with the
    'params' weighting a unit twice the size counts twice, with 'matrices' alike."""
    small = unit_curve("self_attn.k_proj", (0,), synthetic("hard", 32, 16, seed=7))
    large = unit_curve("mlp.up_proj", (0,), synthetic("hard", 32, 32, seed=8))
    spec = UniformSpec("cospadi", 0.4, 2.0)
    for weighting, expected in (("params", (1 / 3, 2 / 3)), ("matrices", (0.5, 0.5))):
        plan = plan_budgets([small, large], spec, weighting)
        assert plan.weights == pytest.approx(list(expected))
        value = sum(w * plan.chosen(i).error for i, w in enumerate(plan.weights))
        assert plan.allocation.value == pytest.approx(value)
        uniform = sum(w * c.options[i].error
                      for w, c, i in zip(plan.weights, (small, large), plan.uniform,
                                         strict=True))
        assert plan.uniform_value == pytest.approx(uniform)
    energy = plan_budgets([small, large], spec, "energy").weights
    assert energy[1] / energy[0] == pytest.approx(large.energy / small.energy)


def test_loss_weight_is_energy_times_sensitivity():
    """'loss' weighs a unit's relative error by ||R W||^2 (absolute error) times its
    output's loss sensitivity; a group averages its members' sensitivities."""
    small = unit_curve("self_attn.k_proj", (0,), synthetic("hard", 32, 16, seed=7))
    large = unit_curve("mlp.up_proj", (1, 2), synthetic("hard", 32, 32, seed=8))
    spec = UniformSpec("cospadi", 0.4, 2.0)
    sens = {"self_attn.k_proj@0": 3.0, "mlp.up_proj@1": 1.0, "mlp.up_proj@2": 0.5}
    weights = plan_budgets([small, large], spec, "loss", sensitivity=sens).weights
    assert weights[0] / weights[1] == pytest.approx(3.0 * small.energy /
                                                    (0.75 * large.energy))
    with pytest.raises(ValueError, match="allocation-weight loss.*mlp.up_proj@2"):
        plan_budgets([small, large], spec, "loss", sensitivity={"self_attn.k_proj@0": 1.0,
                                                                 "mlp.up_proj@1": 1.0})


def test_band_keeps_every_unit_near_its_uniform_bytes():
    spec = UniformSpec("cospadi", 0.5, 2.0)
    curves = _easy_hard_curves(spec, lambda index: (index,))
    free = plan_budgets(curves, spec, "params")
    banded = plan_budgets(curves, spec, "params", band=0.25)
    moved = False
    for unit, curve in enumerate(curves):
        base = curve.options[banded.uniform[unit]].bytes
        chosen = banded.chosen(unit).bytes
        assert 0.75 * base <= chosen <= 1.25 * base
        moved |= chosen != base
    # the unbounded plan leaves the band (else the test shows nothing), the banded one
    # still moves bytes; a constrained plan is never better than the free one, never worse
    # than uniform
    assert any(not 0.75 <= free.chosen(u).bytes / c.options[free.uniform[u]].bytes <= 1.25
               for u, c in enumerate(curves))
    assert moved
    assert free.allocation.value <= banded.allocation.value + 1e-12
    assert banded.allocation.value < banded.uniform_value
    with pytest.raises(ValueError, match="allocation-band"):
        plan_budgets(curves, spec, "params", band=1.0)


def test_svd_chosen_where_it_wins_holds_at_equal_bytes():
    """An exactly rank-8 matrix with spread-out singular vectors: at ratio 0.8 rank 8 fits
    the uniform dictionary's bytes and is exact, while that dictionary (s = 6 < 8 codes
    per column) cannot be. The allocation picks the low-rank option, and factorising
    confirms both its error and its win."""
    g = torch.Generator().manual_seed(3)
    d1, d2 = 64, 128
    w = torch.randn(d1, 8, generator=g, dtype=torch.float64) @ \
        torch.randn(8, d2, generator=g, dtype=torch.float64)
    spec = UniformSpec("cospadi", 0.8, 2.0)
    _, _, k, s, _ = spec.option_of(d1, d2)
    assert s < 8
    curve = unit_curve("self_attn.q_proj", (0,), w, extra=((k, s),))
    plan = plan_budgets([curve], spec, "params")
    chosen, uniform = plan.chosen(0), curve.options[uniform_index(curve, spec)]
    assert chosen.method == "lowrank" and chosen.r >= 8
    # exact up to the eigen route's rounding of the energy (~1e-15 of the total)
    assert chosen.bytes <= uniform.bytes and chosen.error < 1e-12
    identity = whitening_from_gram(torch.eye(d1, dtype=torch.float64))
    settings = SolverSettings(iters=4)
    _, achieved_svd = factorize_option([w], identity, settings, chosen)
    _, achieved_dict = factorize_option([w], identity, settings, uniform)
    assert achieved_svd == pytest.approx(chosen.error, abs=1e-10)  # SVD curve is exact
    assert achieved_svd < 1e-10 < achieved_dict


def test_curve_errors_match_the_factorisation():
    """Predicted low-rank errors are exact; the dictionary prediction is the warm start's
    (a solver refining from it ends at or below it)."""
    w = synthetic("hard", 32, 40, seed=5)
    curve = unit_curve("mlp.up_proj", (0,), w)
    identity = whitening_from_gram(torch.eye(32, dtype=torch.float64))
    low = next(o for o in curve.options if o.method == "lowrank" and o.r == 10)
    _, error = factorize_option([w], identity, SolverSettings(), low)
    # factors are handed out in float32 (rounding ~6e-8 per entry): exact to ~1e-7
    assert error == pytest.approx(low.error, rel=1e-6)
    sizes = [o.bytes for o in curve.options]
    assert curve.options[-1].method == "dense" and curve.options[-1].bytes == max(sizes)
    for option in curve.options:
        if option.method == "dictionary":
            assert option.k <= 32 and 0.0 < option.error < 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc")
    model = make_model(root / "model", "llama", layers=2)
    text = calib_text(root / "calib.txt")
    return root, model, text


def compress_args(model, text, out, *extra: str) -> list[str]:
    return ["-q", "compress", "--model", str(model), "--out", str(out), "--calib-text",
            str(text), "--calib-samples", "4", "--seq-len", "32", "--iters", "2",
            "--ratio", "0.4", "--torch-threads", "1", *extra]


def test_pipeline_global_allocation(tiny, capsys):
    root, model, text = tiny
    uniform, glob = root / "uniform", root / "global"
    assert main(compress_args(model, text, uniform)) == 0
    assert main(compress_args(model, text, glob, "--allocation", "global")) == 0
    capsys.readouterr()
    reports = {}
    for out in (uniform, glob):
        assert main(["inspect", str(out), "--json"]) == 0
        reports[out] = json.loads(capsys.readouterr().out)
    achieved = reports[glob]["compressed"]
    # equal bytes: never more than the uniform plan, and within 1 % of it
    assert achieved["bytes"] <= reports[uniform]["compressed"]["bytes"]
    assert achieved["bytes"] >= 0.99 * reports[uniform]["compressed"]["bytes"]
    assert achieved["dense_params"] == reports[uniform]["compressed"]["dense_params"]
    allocation = reports[glob]["allocation"]
    assert len(allocation) == 2 * 7
    for record in allocation.values():
        assert {"method", "predicted", "achieved", "bytes"} <= set(record)
    summary = json.loads((root / "global.work" / "allocation.json").read_text())
    assert summary["proxy"] <= summary["uniform_proxy"]
    # loads with stock transformers and runs
    loaded = AutoModelForCausalLM.from_pretrained(glob, trust_remote_code=True,
                                                  dtype=torch.float32)
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    # dry-run shows the chosen budgets; inspect's text form too
    assert main(compress_args(model, text, glob, "--allocation", "global", "--dry-run")
                [1:]) == 0
    out = capsys.readouterr().out
    assert "allocation global" in out and "predicted" in out
    assert main(["inspect", str(glob)]) == 0
    assert "achieved" in capsys.readouterr().out
    # per-group runs allocate per group matrix: q, k, v, gate, up shared, o and down per layer
    grouped = root / "grouped"
    assert main(compress_args(model, text, grouped, "--allocation", "global",
                              "--group-size", "2")) == 0
    units = json.loads((root / "grouped.work" / "allocation.json").read_text())["units"]
    assert len(units) == 5 + 2 * 2
    assert units["self_attn.q_proj@0-1"]["d2"] == 2 * 64
    assert AutoModelForCausalLM.from_pretrained(grouped, trust_remote_code=True) is not None


def test_global_resume_and_fingerprint(tiny, capsys):
    root, model, text = tiny
    out = root / "resume"
    args = compress_args(model, text, out, "--allocation", "global", "--keep-work")
    assert main(args) == 0
    work = root / "resume.work"
    first = {p.name: p.read_bytes() for p in (work / "factors").iterdir()}
    # lose the allocation file and the factor records: allocate and factor run again
    (work / "allocation.json").unlink()
    for record in (work / "done").glob("factor-*.json"):
        record.unlink()
    (work / "done" / "assemble.json").unlink()
    assert main(args) == 0
    assert {p.name: p.read_bytes() for p in (work / "factors").iterdir()} == first
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    # another allocation on the same work dir is refused, naming the setting
    assert main(compress_args(model, text, out, "--keep-work")) == 2
    assert "allocation" in capsys.readouterr().err


def test_global_with_compressed_propagation_refused(tiny, capsys):
    root, model, text = tiny
    assert main(compress_args(model, text, root / "bad", "--allocation", "global",
                              "--propagate", "compressed")) == 2
    assert "propagate" in capsys.readouterr().err


def test_whole_model_sensitivity_reference(tiny, tmp_path):
    """tools/sensitivity.py (the whole-model reference the streamed pass is compared with)
    measures a_j = E||dL/dy_j||^2 / d_out, checked here against autograd on one
    projection's output."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import sensitivity as tool

    root, model, text = tiny
    flags = ["--model", str(model), "--calib-text", str(text), "--calib-samples", "4",
             "--seq-len", "32", "--torch-threads", "1"]
    path = tmp_path / "sensitivity.json"
    assert tool.main(["--out", str(path), "--micro-batch", "3", *flags]) == 0
    measured = json.loads(path.read_text())["sensitivity"]
    assert len(measured) == 2 * 7 and all(v > 0 for v in measured.values())
    # independent: the gradient of the summed loss at layer 1's v_proj output, all windows
    from cospadi.pipeline.cli import config_from_args, parse
    from cospadi.stages.calib_data import calibration_set

    ids = calibration_set(config_from_args(parse(["compress", "--out", "x", *flags])),
                          str(model)).ids
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    held = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        held.append(output)
    net.model.layers[1].self_attn.v_proj.register_forward_hook(keep)
    total = 0.0
    for batch in (ids[:3], ids[3:]):  # the tool's micro-batches
        logits = net(batch).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          batch[:, 1:].reshape(-1), reduction="sum").backward()
        total += float(held[-1].grad.double().square().sum())
    d_out = net.model.layers[1].self_attn.v_proj.out_features
    # float32 gradients summed in another order: agreement to ~1e-5 relative
    assert measured["self_attn.v_proj@1"] == pytest.approx(total / ids.numel() / d_out,
                                                           rel=1e-4)


def test_calibrating_solve_in_the_spectral_basis_reaches_the_same_error():
    """The curve task's short solve runs on the spectrum's codes Sigma V^T instead of W_L
    (sparing the solver a second SVD): W_L = U (Sigma V^T) with U orthonormal, so the
    error is the same; float64 rounding only (1e-8 relative allowed)."""
    from cospadi.pipeline.allocation_tasks import _short_solve_error
    from cospadi.stages.curves import spectrum
    from cospadi.stages.solver_closed import solve_closed

    g = torch.Generator().manual_seed(3)
    for d1, d2, k, s in ((40, 90, 30, 12), (90, 40, 50, 20)):  # d1 < d2, d1 > d2 (k > rank)
        whitened = torch.randn(d1, d2, generator=g, dtype=torch.float64) * \
            torch.logspace(0, -2, d2, dtype=torch.float64)
        _, codes = spectrum(whitened)
        assert codes.shape == (min(d1, d2), d2)
        settings = SolverSettings(method="cospadi", ratio=0.3, rho=2.0, solver="closed",
                                  iters=2, refine_iters=1, dtype=torch.float64)
        plain = solve_closed(whitened, k, s, iters=2, refine=1).stats["error"] ** 2
        assert _short_solve_error(whitened, codes, k, s, settings) == pytest.approx(
            plain, rel=1e-8)
