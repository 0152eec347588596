"""Why MASA does or does not pay on a model: cross-layer weight similarity and per-group
functional errors against SVD-LLM at the same ratio.

    python tools/masa_study.py --model DIR --work RUN.work [--first 10] [--group 4]
        [--ratio 0.2] [--projections q_proj,k_proj,v_proj,o_proj]

Part 1 (weights only): for each projection type, the largest |cos| between vec(W_i) and
vec(W_j) of any two blocks, the mean over adjacent blocks, and the share of the stacked
model's energy in its top principal direction (1 / depth when the layers share nothing).
Part 2 (needs the Grams a ``cospadi compress --keep-work`` run kept): for the group of
``--group`` blocks from ``--first``, the mean relative functional error
``||R_l (W_l - W_hat_l)||^2 / ||R_l W_l||^2`` of SVD-LLM (uniform rank) and of MASA with
S = 0 .. m - 1 atoms (S = 0: no atom, the group's rank allocated across members), with the
ranks each member received.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cospadi.pipeline.manifest import WorkDir
from cospadi.stages.masa import MasaError, masa_group, masa_shape
from cospadi.stages.projections import INPUT_OF, projection_path
from cospadi.stages.sizing import svd_rank
from cospadi.stages.whitening import whitening_from_gram
from cospadi.storage.gram_store import read_grams
from cospadi.storage.shards import ShardReader


def weight(reader: ShardReader, layer: int, projection: str) -> torch.Tensor:
    key = f"model.layers.{layer}.{projection}.weight"
    return reader.load([key], dtype=torch.float32)[key].T.double()


def similarity(reader: ShardReader, layers: int, projection: str) -> dict:
    flat = torch.stack([weight(reader, i, projection).reshape(-1) for i in range(layers)])
    flat = flat / flat.norm(dim=1, keepdim=True)
    cos = (flat @ flat.T - torch.eye(layers, dtype=flat.dtype)).abs()
    adjacent = torch.stack([cos[i, i + 1] for i in range(layers - 1)])
    top = torch.linalg.svdvals(flat)[0].item() ** 2 / layers
    return {"max_cos": cos.max().item(), "adjacent_cos": adjacent.mean().item(),
            "top1_share": top}


def group_errors(reader: ShardReader, work: WorkDir, members: list[int], projection: str,
                 ratio: float) -> dict:
    weights = [weight(reader, i, projection) for i in members]
    whitenings = []
    for i in members:
        grams, tokens = read_grams(work.grams(i), [INPUT_OF[projection]])
        whitenings.append(whitening_from_gram(grams[INPUT_OF[projection]] / tokens))
    d1, d2 = weights[0].shape
    r = svd_rank(d1, d2, ratio).r
    svd = []
    for w, wh in zip(weights, whitenings, strict=True):
        sigma = torch.linalg.svdvals(wh.whiten(w)).square()
        svd.append(float(sigma[r:].sum() / sigma.sum()))
    out = {"svd-llm": (sum(svd) / len(svd), [r] * len(members))}
    for atoms in range(len(members)):
        try:
            shape = masa_shape(d1, d2, len(members), ratio, atoms)
        except MasaError:
            continue
        solved = masa_group(weights, whitenings, shape)
        out[f"S={atoms}"] = (sum(solved.relative_errors) / len(members), solved.ranks)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", help="work dir with kept Grams (part 2)")
    ap.add_argument("--first", type=int, default=10)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--projections", default="q_proj,k_proj,v_proj,o_proj")
    opts = ap.parse_args(argv)
    torch.set_num_threads(1)
    reader = ShardReader(opts.model)
    layers = 1 + max(int(k.split(".")[2]) for k in reader.keys()
                     if k.startswith("model.layers."))
    projections = [projection_path(p.strip()) for p in opts.projections.split(",")]
    print("projection         max |cos| any pair   mean |cos| adjacent   top-1 energy share "
          f"(1/depth = {1 / layers:.4f})")
    for projection in projections:
        s = similarity(reader, layers, projection)
        print(f"{projection:<19}{s['max_cos']:>10.4f}{s['adjacent_cos']:>22.4f}"
              f"{s['top1_share']:>21.4f}")
    if opts.work:
        members = list(range(opts.first, opts.first + opts.group))
        print(f"\nblocks {members}, ratio {opts.ratio}: mean relative functional error "
              "(ranks per member)")
        for projection in projections:
            errors = group_errors(reader, WorkDir(Path(opts.work)), members, projection,
                                  opts.ratio)
            print(f"{projection}: " + "; ".join(f"{key} {e:.4f} {ranks}"
                                                for key, (e, ranks) in errors.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
