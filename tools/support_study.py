"""Quality of structured code supports (2:4, column blocks) against free supports.

    python tools/support_study.py [--model assets/model] [--ratio 0.3] [--json out.json]

On the real model: float64 Grams of every projection input from calibration text (the
dense model's own activations), then for every projection the exact coder of an
orthonormal dictionary (stages/supports.py): U = top-k left singular vectors of the whitened
weight, codes = the structured top selection of ``U^T W_L``. Same k and s for every
structure (2:4 rounds k down to a multiple of 4); bytes per structure are reported (a
block support stores bf16 values and a tiny index, the free one 14-bit values and a bit
per atom and column: equal at rho = 2). Prints the whitened relative error per projection
kind (the output error on the calibration tokens) and the held-out perplexity of the model
with every projection replaced, next to SVD-LLM at the same ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cospadi.stages.calibration import calibration_ids, load_tokenizer, read_text
from cospadi.stages.evaluate import perplexity
from cospadi.stages.projections import INPUT_OF, INPUTS, PROJECTIONS
from cospadi.stages.sizing import dictionary_bytes, dictionary_shape, svd_rank
from cospadi.stages.supports import atom_order, parse_support, select
from cospadi.stages.whitening import whitening_from_gram

REPO = Path(__file__).resolve().parent.parent


def layer_grams(model, ids: torch.Tensor, micro_batch: int) -> dict[tuple[int, str], torch.Tensor]:
    """Mean float64 Gram of each (layer, input) over the calibration tokens."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for name, projections in INPUTS.items():
            def hook(_m, args, index=index, name=name):
                # float32 products of one micro-batch, summed in float64
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                key = (index, name)
                grams[key] = grams.get(key, 0) + (x.T @ x).double()
            handles.append(layer.get_submodule(projections[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, len(ids), micro_batch):
            model(ids[start:start + micro_batch], use_cache=False)
    for handle in handles:
        handle.remove()
    return {key: gram / ids.numel() for key, gram in grams.items()}


def study(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.torch_threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    ids = calibration_ids(read_text(args.calib), tokenizer, args.samples, args.seq_len)
    start = time.perf_counter()
    cache = Path(args.grams_cache) if args.grams_cache else None
    if cache is not None and cache.is_file():
        grams = torch.load(cache)
    else:
        grams = layer_grams(model, ids, 4)
        if cache is not None:
            torch.save(grams, cache)
    print(f"grams of {len(model.model.layers)} blocks in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    supports = [parse_support(name) for name in args.supports]
    variants = [s.name for s in supports] + ["svd-llm"]
    errors: dict[str, dict[str, list[float]]] = {v: defaultdict(list) for v in variants}
    kept_bytes: dict[str, list[int]] = {v: [0, 0] for v in variants}
    # reconstructions kept in bf16 (as a checkpoint stores them): 2 bytes x params each
    replaced: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants}
    originals: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        whitenings = {name: whitening_from_gram(grams.pop((index, name)))
                      for name in INPUTS}
        for projection in PROJECTIONS:
            linear = layer.get_submodule(projection)
            key = f"model.layers.{index}.{projection}.weight"
            originals[key] = linear.weight.detach().clone()
            w = linear.weight.detach().T.double()
            d1, d2 = w.shape
            whitening = whitenings[INPUT_OF[projection]]
            wl = whitening.whiten(w)
            total = float(wl.square().sum())
            u, sigma, vh = torch.linalg.svd(wl, full_matrices=False)
            scores_all = sigma[:, None] * vh
            for support in supports:
                shape = dictionary_shape(d1, d2, args.ratio, args.rho, support.name)
                order = atom_order(shape.k, support)
                scores = scores_all[:shape.k][order]
                mask = select(scores, shape.s, support)
                kept = float(scores[mask].square().sum())
                errors[support.name][projection].append(max(total - kept, 0.0) ** 0.5
                                                        / total ** 0.5)
                kept_bytes[support.name][0] += dictionary_bytes(d1, d2, shape.k, shape.s,
                                                                support.name)
                kept_bytes[support.name][1] += 2 * d1 * d2
                w_hat = whitening.unwhiten(u[:, :shape.k][:, order] @ (scores * mask))
                replaced[support.name][key] = w_hat.T.to(torch.bfloat16)
            r = svd_rank(d1, d2, args.ratio).r
            errors["svd-llm"][projection].append(float(sigma[r:].square().sum()) ** 0.5
                                                 / total ** 0.5)
            kept_bytes["svd-llm"][0] += 2 * r * (d1 + d2)
            kept_bytes["svd-llm"][1] += 2 * d1 * d2
            replaced["svd-llm"][key] = whitening.unwhiten(
                u[:, :r] * sigma[:r] @ vh[:r]).T.to(torch.bfloat16)
        print(f"block {index} coded", file=sys.stderr)
    text = read_text(args.eval)
    result: dict = {"ratio": args.ratio, "rho": args.rho, "samples": args.samples,
                    "seq_len": args.seq_len, "windows": args.max_windows, "variants": {}}
    dense = perplexity(model, tokenizer, text, 512, args.max_windows, progress=False)
    result["dense_ppl"] = dense["ppl"]
    params = dict(model.named_parameters())
    for variant in variants:
        with torch.no_grad():
            for key, weight in replaced[variant].items():
                params[key].copy_(weight)
        ppl = perplexity(model, tokenizer, text, 512, args.max_windows, progress=False)["ppl"]
        result["variants"][variant] = {
            "ppl": ppl, "kept_bytes": kept_bytes[variant][0] / kept_bytes[variant][1],
            "errors": {p: sum(v) / len(v) for p, v in errors[variant].items()}}
        print(f"{variant}: ppl {ppl:.2f}", file=sys.stderr)
    with torch.no_grad():
        for key, weight in originals.items():
            params[key].copy_(weight)
    return result


def table(result: dict) -> str:
    lines = ["| support | kept bytes | ppl | " + " | ".join(PROJECTIONS) + " |",
             "|---|---|---|" + "---|" * len(PROJECTIONS)]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['kept_bytes']:.4f} | {v['ppl']:.2f} | "
                     + " | ".join(f"{v['errors'][p]:.4f}" for p in PROJECTIONS) + " |")
    lines.append(f"(dense ppl {result['dense_ppl']:.2f}; errors: mean whitened relative error "
                 "per projection kind over all blocks)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "assets" / "model"))
    ap.add_argument("--calib", default=str(REPO / "assets" / "calib.txt"))
    ap.add_argument("--eval", default=str(REPO / "assets" / "eval.txt"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--supports", nargs="+",
                    default=["free", "2:4", "block16", "block32", "block64"])
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--grams-cache", help="save the Grams here, or load them if present")
    args = ap.parse_args(argv)
    result = study(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
