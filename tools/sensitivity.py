"""Loss sensitivity of every projection's output, from one backward pass (whole model).

    python tools/sensitivity.py --model M --calib-text T --out sensitivity.json
        [--calib-samples 32] [--seq-len 256] [--micro-batch 4] [--torch-threads 1]

For a perturbation ``e`` of a projection's output ``y``, the loss changes by about
``g . e + 1/2 (g . e)^2``-type terms with ``g = dL/dy``; the Fisher estimate of the
expected increase is ``1/2 E[(g . e)^2] ~ 1/2 (E||g||^2 / d_out) E||e||^2`` (isotropic
in the output directions). So each matrix's absolute functional error ``E||e||^2`` (per
token) is weighted by ``a = E||g||^2 / d_out``, with ``L`` the summed next-token loss of
each calibration window. Same calibration windows as ``cospadi compress`` (its own
calibration code and flags), full precision, the dense model.

Writes ``{"sensitivity": {"<projection>@<layer>": a, ...}, "tokens": N, "loss": mean}``.
This is the whole-model first verdict; a streamed run would recompute each block from its
stored inputs and carry ``dL/dh`` down block by block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from cospadi.pipeline.cli import config_from_args, parse
    from cospadi.stages.calib_data import calibration_set
    from cospadi.stages.projections import PROJECTIONS
    from cospadi.storage.atomic import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=1)
    opts, rest = ap.parse_known_args(argv)
    torch.set_num_threads(opts.torch_threads)
    cfg = config_from_args(parse(["compress", "--out", "unused", *rest]))
    ids = calibration_set(cfg, cfg.model).ids
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    model.eval()
    sums: dict[str, float] = {}
    dims: dict[str, int] = {}
    hooks = []
    for layer, block in enumerate(model.model.layers):
        for projection in PROJECTIONS:
            module = block.get_submodule(projection)
            key = f"{projection}@{layer}"
            dims[key] = module.out_features
            sums[key] = 0.0

            def hook(_m, _gin, gout, key=key):
                sums[key] += float(gout[0].to(torch.float64).square().sum())
            hooks.append(module.register_full_backward_hook(hook))
    start = time.perf_counter()
    total_loss, tokens = 0.0, 0
    for lo in range(0, len(ids), opts.micro_batch):
        batch = ids[lo:lo + opts.micro_batch]
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        total_loss += float(loss.detach())
        tokens += batch.numel()
        print(f"windows {lo + len(batch)}/{len(ids)}: {time.perf_counter() - start:.1f} s",
              flush=True)
    for h in hooks:
        h.remove()
    # per calibration token (the Grams' normalisation), per output coordinate
    sensitivity = {key: sums[key] / tokens / dims[key] for key in sums}
    write_json(Path(opts.out), {"sensitivity": sensitivity, "tokens": tokens,
                                "loss": total_loss / (len(ids) * (ids.shape[1] - 1)),
                                "seconds": round(time.perf_counter() - start, 1)})
    print(f"wrote {opts.out} ({len(sensitivity)} matrices, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
