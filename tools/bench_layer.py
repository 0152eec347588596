"""One projection, dense against the compressed runtime forms (CPU, one thread, bf16).

    python tools/bench_layer.py [--shape 576 1536] [--ratio 0.3] [--rows 1 8 512]

Times ``nn.functional.linear`` with the dense weight against the modeling file's
``CospadiDictionaryLinear`` with a free support (bit-mask + 14-bit values, decoded per
call on CPU) and block supports, on random factors of the pipeline's shapes; with
``--gather``, also a free support held as a per-column atom index (ELL: s x d2 int64, what
a gather needs; 4x the bit-mask's bytes) applied by one gather, eagerly and compiled by
``torch.compile`` (inductor's C++ code on CPU): the best torch can do without decoding,
to show what stops free supports on CPU. Runs are
interleaved (every form once per round, best of the rounds) so that a busy machine slows
all forms alike; the table gives microseconds per call and speed relative to dense.
"""

from __future__ import annotations

import argparse
import time

import torch

from cospadi.stages.sizing import dictionary_shape
from cospadi.storage import modeling_template as mt
from cospadi.storage.sparse_format import pack_codes


def layers(d1: int, d2: int, ratio: float, supports: list[str], dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for support in supports:
        shape = dictionary_shape(d1, d2, ratio, 2.0, support)
        k, s = shape.k, shape.s
        layer = mt.CospadiDictionaryLinear(d1, d2, k, s, False, True, support)
        with torch.no_grad():
            layer.dictionary.copy_(torch.randn(k, d1, generator=g))  # D^T
            if layer.block:
                blocks = d2 // layer.block
                index = torch.rand(blocks, k, generator=g).argsort(dim=1)[:, :s]
                layer.index.copy_(index.sort(dim=1).values.to(torch.int16))
                layer.values.copy_(torch.randn(blocks, s, layer.block, generator=g))
            else:
                chosen = torch.rand(k, d2, generator=g).argsort(dim=0)[:s].sort(dim=0).values
                packed = pack_codes(chosen, torch.randn(s, d2, generator=g), k)
                layer.mask.copy_(packed["mask"])
                layer.values14.copy_(packed["values14"])
        out[support] = layer.to(dtype)
    return out


def gather_forms(d1: int, d2: int, ratio: float, dtype: torch.dtype) -> dict:
    """Free support as an atom index per column: ``y_j = sum_t v_tj z[idx_tj]``, z = x D."""
    g = torch.Generator().manual_seed(2)
    shape = dictionary_shape(d1, d2, ratio, 2.0, "free")
    dictionary_t = torch.randn(shape.k, d1, generator=g).to(dtype)
    index = torch.rand(d2, shape.k, generator=g).argsort(dim=1)[:, :shape.s].sort(dim=1).values
    values = torch.randn(d2, shape.s, generator=g).to(dtype)

    def gather(x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(x, dictionary_t)  # rows x k
        return (z[:, index] * values).sum(dim=-1)  # rows x d2

    return {"gather": gather, "gather-compiled": torch.compile(gather, dynamic=False)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[576, 1536], metavar=("D1", "D2"))
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--supports", nargs="+", default=["free", "block32", "block64", "block128"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.2, help="per form per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gather", action="store_true",
                    help="also the ELL gather, eager and torch.compile'd (batch <= 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d1, d2 = args.shape
    dtype = torch.bfloat16
    weight = torch.randn(d2, d1, generator=torch.Generator().manual_seed(1)).to(dtype)
    forms = {"dense": lambda x: torch.nn.functional.linear(x, weight),
             **layers(d1, d2, args.ratio, args.supports, dtype)}
    if args.gather:
        forms.update(gather_forms(d1, d2, args.ratio, dtype))
    print(f"{d1} x {d2}, gamma {args.ratio}, bf16, {args.threads} thread(s); us per call "
          "(speed vs dense)")
    for rows in args.rows:
        x = torch.randn(rows, d1).to(dtype)
        best = {name: float("inf") for name in forms}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, form in forms.items():
                    form(x)
                    start, calls = time.perf_counter(), 0
                    while time.perf_counter() - start < args.seconds:
                        form(x)
                        calls += 1
                    best[name] = min(best[name], (time.perf_counter() - start) / calls)
        cells = [f"{name} {best[name] * 1e6:.0f} ({best['dense'] / best[name]:.2f}x)"
                 for name in forms if name != "dense"]
        print(f"rows {rows:>4}: dense {best['dense'] * 1e6:.0f}; " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
