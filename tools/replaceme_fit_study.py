"""ReplaceMe fit variants on SmolLM2-135M, whole model in memory (a quick study, not the
pipeline): least squares against the cosine-loss map, per window, by perplexity.

    OMP_NUM_THREADS=1 python tools/replaceme_fit_study.py --windows 4:12,6:13,8:11,9:10

``N:l`` prunes blocks ``l..l+N-1`` (the windows the pipeline chose, results/replaceme.md).
Calibration and evaluation follow the reproduce protocol (32 x 256 tokens of
``assets/calib.txt``, the first 20 windows of 512 of ``assets/eval.txt``). Prints one JSON
line per (window, fit) and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent


def capture(model, ids: torch.Tensor, windows: dict[int, int]) -> dict:
    """Hidden states entering the blocks the fits need and the MLP outputs of l - 1."""
    layers = model.model.layers
    wanted_inputs = {j for n, s in windows.items() for j in (s, s + n)}
    wanted_mlp = {s - 1 for s in windows.values()}
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for j in wanted_inputs:
        def pre(_m, args, kwargs, j=j):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(f"h{j}", []).append(hidden.detach().reshape(-1, hidden.shape[-1]))
        handles.append(layers[j].register_forward_pre_hook(pre, with_kwargs=True))
    for k in wanted_mlp:
        def post(_m, _a, out, k=k):
            seen.setdefault(f"m{k}", []).append(out.detach().reshape(-1, out.shape[-1]))
        handles.append(layers[k].mlp.register_forward_hook(post))
    with torch.no_grad():
        for lo in range(0, ids.shape[0], 8):
            model.model(ids[lo:lo + 8])
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def fit_cosine(m: torch.Tensor, rest: torch.Tensor, target: torch.Tensor,
               init: torch.Tensor, epochs: int, lr: float, batch: int, seed: int = 0
               ) -> tuple[torch.Tensor, list[float]]:
    """T minimising mean(1 - cos(M T + rest, target)) by Adam over shuffled row batches."""
    from cospadi.stages.replaceme import cosine_fit_epoch  # the pipeline's step

    t = init.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(m.shape[0], generator=gen)
        batches = ((m[idx], rest[idx], target[idx])
                   for idx in order.split(batch))
        losses.append(cosine_fit_epoch(t, opt, batches))
    return t.detach().double(), losses


def mean_cos_distance(m, rest, target, t) -> float:
    pred = m.double() @ t + rest.double()
    return float((1 - torch.nn.functional.cosine_similarity(pred, target.double(), dim=1)).mean())


def pruned_ppl(model, tok, text: str, start: int, n: int, t: torch.Tensor | None,
               windows: int) -> float:
    """Perplexity with blocks start..start+n-1 removed and T folded (restored after)."""
    from cospadi.stages.evaluate import perplexity

    layers = model.model.layers
    depth = model.config.num_hidden_layers
    down = layers[start - 1].mlp.down_proj
    original = down.weight.data.clone()
    if t is not None:
        down.weight.data = (t.T @ original.double()).float()
    model.model.layers = torch.nn.ModuleList(
        [layers[i] for i in range(depth) if not start <= i < start + n])
    model.config.num_hidden_layers = depth - n
    try:
        return perplexity(model, tok, text, 512, windows, progress=False)["ppl"]
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = depth
        down.weight.data = original


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", default="4:12,6:13,8:11,9:10")
    ap.add_argument("--fits", default="lstsq,cosine-ls,cosine-id")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "runs" / "replaceme" / "fit-study.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cospadi.stages.calib_data import calibration_set
    from cospadi.stages.calibration import read_text
    from cospadi.stages.replaceme import FitAccumulator, solve_transform

    model_dir = REPO / "assets" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = SimpleNamespace(bos="auto", calib_data=None, calib_text=str(REPO / "assets" /
                          "calib.txt"), calib_samples=32, seq_len=256)
    ids = calibration_set(cfg, model_dir, tok).ids
    text = read_text(REPO / "assets" / "eval.txt")
    windows = {int(a): int(b) for a, b in (w.split(":") for w in args.windows.split(","))}
    begin = time.perf_counter()
    acts = capture(model, ids, windows)
    print(f"captured in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, start in windows.items():
        m, h_in, h_out = acts[f"m{start - 1}"], acts[f"h{start}"], acts[f"h{start + n}"]
        acc = FitAccumulator()
        acc.add(m, h_in, h_out)
        ls = solve_transform(acc.mtm, acc.mtb).matrix
        rest = h_in - m
        for fit in args.fits.split(","):
            t0 = time.perf_counter()
            losses: list[float] = []
            if fit == "drop":
                t = None
            elif fit == "lstsq":
                t = ls
            else:
                init = ls if fit == "cosine-ls" else torch.eye(ls.shape[0], dtype=torch.float64)
                t, losses = fit_cosine(m, rest, h_out, init, args.epochs, args.lr, args.batch)
            fit_s = time.perf_counter() - t0
            # dropping the window is T = I (M I + h_l - M = h_l)
            cos = mean_cos_distance(m, rest, h_out, torch.eye(m.shape[1], dtype=torch.float64)
                                    if t is None else t)
            ppl = pruned_ppl(model, tok, text, start, n, t, args.eval_windows)
            row = {"n": n, "start": start, "fit": fit, "ppl": ppl, "calib_cos_dist": cos,
                   "fit_seconds": round(fit_s, 1), "epochs": args.epochs, "lr": args.lr,
                   "batch": args.batch, "losses": [round(x, 5) for x in losses],
                   "t_norm": None if t is None else float(torch.linalg.matrix_norm(t, 2))}
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
