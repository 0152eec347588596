"""Why does CoSpaDi beat (or not beat) SVD-LLM here? One block's functional errors.

    python tools/layer_study.py [--block 15] [--ratio 0.3] [--calib 32x256,128x256]
        [--iters 1,2,4] [--omp-atoms 8] [--heldout-windows 8] [--json out.json]
    python tools/layer_study.py --curve 60 [--calib 32x256] [--projections q_proj,o_proj]

For every projection of one decoder block of the demo model, the relative functional
error ``||X (W - W_hat)||_F / ||X W||_F`` of SVD-LLM and of CoSpaDi (K-SVD after each of
``--iters`` iterations) at the same kept fraction, where ``X`` is

- the calibration activations the factors were fitted on (what the solver minimises), and
- held-out activations (the first windows of the evaluation text, 512 tokens each),

for each calibration size in ``--calib``. Activations come from the dense model (the
pipeline's ``--propagate original``), Grams in float64 via forward pre-hooks; the model
runs only up to the studied block. Perplexity integrates these errors over 210 matrices,
so a method that wins here on held-out error should win on perplexity too.

``--curve N`` instead runs K-SVD once for N iterations per projection and prints the
calibration error after 1, 2, 4, 8, ... iterations (the held-out/calibration error ratio
between methods barely moves with the calibration set, so the curve stands for both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from fetch_assets import DEFAULT_DEST  # noqa: E402

from cospadi.stages.calibration import calibration_ids, read_text  # noqa: E402
from cospadi.stages.evaluate import tokenize, windows_of  # noqa: E402
from cospadi.stages.factorize import SolverSettings, factorize_group  # noqa: E402

# projection -> module whose input it reads (q, k, v share; gate, up share)
INPUTS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.q_proj",
          "v_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj",
          "gate_proj": "mlp.gate_proj", "up_proj": "mlp.gate_proj",
          "down_proj": "mlp.down_proj"}
MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
           "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


class _Stop(Exception):
    pass


@torch.inference_mode()
def block_grams(model, block: int, windows: torch.Tensor, batch: int = 4) -> dict:
    """float64 X^T X of each distinct projection input of ``block`` over ``windows``."""
    layer = model.model.layers[block]
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in sorted(set(INPUTS.values())):
        def hook(_module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))

    def stop(*_):
        raise _Stop

    handles.append(layer.register_forward_hook(stop))
    try:
        for start in range(0, len(windows), batch):
            try:
                model(input_ids=windows[start:start + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return grams


def rel_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    diff = (weight - approx).double()
    w = weight.double()
    return float((torch.trace(diff.T @ gram @ diff) / torch.trace(w.T @ gram @ w)).sqrt())


def error_curves(model, tok, calib_text: str, opts: argparse.Namespace) -> int:
    """Calibration functional error of K-SVD after every iteration (one run), vs SVD-LLM."""
    from cospadi.stages.ksvd import ksvd
    from cospadi.stages.sizing import dictionary_shape
    from cospadi.stages.whitening import whitening_from_gram

    samples, seq_len = opts.calib[0]
    grams = block_grams(model, opts.block, calibration_ids(calib_text, tok, samples, seq_len))
    layer = model.model.layers[opts.block]
    marks = [i for i in (1, 2, 4, 8, 16, 32, 60, 100) if i <= opts.curve]
    rows = []
    for proj in opts.projections.split(","):
        weight = layer.get_submodule(MODULES[proj]).weight.detach().T.contiguous()
        gram = grams[INPUTS[proj]]
        svd = factorize_group([weight], [gram], SolverSettings(
            method="svd-llm", ratio=opts.ratio)).factors[0].dense()
        whitened = whitening_from_gram(gram).whiten(weight.double()).float()
        shape = dictionary_shape(*weight.shape, opts.ratio, opts.rho)
        t0 = time.perf_counter()
        result = ksvd(whitened, shape.k, shape.s, iters=opts.curve,
                      atoms_per_step=opts.omp_atoms)
        row = {"projection": proj, "svd": rel_error(weight, svd, gram),
               "ksvd": result.errors, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{proj:>9}: SVD-LLM {row['svd']:.3f}; K-SVD " + "  ".join(
            f"{i} it {result.errors[i - 1]:.3f}" for i in marks)
            + f"  ({row['seconds']} s)", flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"block": opts.block, "ratio": opts.ratio,
                                               "calib": opts.calib[0], "rows": rows}))
    return 0


def parse_calib(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(DEFAULT_DEST))
    ap.add_argument("--block", type=int, default=15)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--calib", type=parse_calib, default=parse_calib("32x256,128x256"))
    ap.add_argument("--iters", default="1,2,4", help="K-SVD iteration counts to score")
    ap.add_argument("--omp-atoms", type=int, default=8, help="1: exact OMP; b > 1: gOMP")
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--projections", default=",".join(MODULES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve", type=int, default=0,
                    help="instead: one K-SVD run of this many iterations per projection on "
                         "the first --calib, calibration error after each iteration")
    ap.add_argument("--json")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = Path(opts.assets)
    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(assets / "model")
    heldout = windows_of(tokenize(tok, read_text(assets / "eval.txt")), 512,
                         opts.heldout_windows)
    t0 = time.perf_counter()
    held = block_grams(model, opts.block, heldout)
    print(f"held-out Grams ({heldout.numel()} tokens) in {time.perf_counter() - t0:.0f} s")
    calib_text = read_text(assets / "calib.txt")
    if opts.curve:
        return error_curves(model, tok, calib_text, opts)
    iters = sorted(int(v) for v in opts.iters.split(","))
    layer = model.model.layers[opts.block]
    rows = []
    for samples, seq_len in opts.calib:
        t0 = time.perf_counter()
        ids = calibration_ids(calib_text, tok, samples, seq_len)
        cal = block_grams(model, opts.block, ids)
        print(f"calibration {samples}x{seq_len} Grams in {time.perf_counter() - t0:.0f} s")
        for proj in opts.projections.split(","):
            weight = layer.get_submodule(MODULES[proj]).weight.detach().T.contiguous()
            g_cal, g_held = cal[INPUTS[proj]], held[INPUTS[proj]]
            row = {"calib": f"{samples}x{seq_len}", "projection": proj,
                   "shape": list(weight.shape)}
            svd = factorize_group([weight], [g_cal], SolverSettings(
                method="svd-llm", ratio=opts.ratio)).factors[0].dense()
            row["svd"] = {"calib": rel_error(weight, svd, g_cal),
                          "heldout": rel_error(weight, svd, g_held)}
            for it in iters:
                t0 = time.perf_counter()
                approx = factorize_group([weight], [g_cal], SolverSettings(
                    method="cospadi", solver="ksvd", ratio=opts.ratio, rho=opts.rho, iters=it,
                    atoms_per_step=opts.omp_atoms)).factors[0].dense()
                row[f"ksvd{it}"] = {"calib": rel_error(weight, approx, g_cal),
                                    "heldout": rel_error(weight, approx, g_held),
                                    "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            cells = "  ".join(f"{k} {v['calib']:.3f}/{v['heldout']:.3f}"
                              for k, v in row.items() if isinstance(v, dict))
            print(f"{row['calib']:>8} {proj:>9}: (calib/held-out) {cells}", flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"settings": {k: v for k, v in vars(opts).items()
                                                            if k != "calib"},
                                               "calib": opts.calib, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
