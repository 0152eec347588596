"""Project the K-SVD solve time of a whole model from a measured useful-FLOP rate.

    python tools/project_cost.py --rate-gflops 2.0 [--ratio 0.2] [--iters 60]

Useful FLOPs are counted as tools/bench_solvers.py counts them (Batch-OMP
``k s^2 / 2 + s^3 / 3`` per column, atom sweep ``2 (2p + 1) d1 s d2``), for every projection
of every block at the given ratio and rho = 2; the time is that count over the rate you
measured (``achieved_gflop_rate`` of the bench's largest shape on your machine).
"""

from __future__ import annotations

import argparse

from cospadi.stages.sizing import dictionary_shape

# (layers, hidden, intermediate, q heads * head dim, kv heads * head dim)
MODELS = {
    "SmolLM2-135M": (30, 576, 1536, 576, 192),
    "Llama-3.2-1B": (16, 2048, 8192, 2048, 512),
    "Llama-3-8B": (32, 4096, 14336, 4096, 1024),
    "Llama-3-70B": (80, 8192, 28672, 8192, 1024),
}


def projection_shapes(hidden: int, inter: int, q: int, kv: int) -> list[tuple[int, int]]:
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden),
            (hidden, inter), (hidden, inter), (inter, hidden)]


def iteration_flops(d1: int, d2: int, ratio: float, power_iters: int) -> float:
    shape = dictionary_shape(d1, d2, ratio, 2.0)
    k, s = shape.k, shape.s
    return d2 * (k * s * s / 2 + s**3 / 3) + 2 * (2 * power_iters + 1) * d1 * s * d2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-gflops", type=float, required=True,
                        help="measured useful GFLOP/s of one K-SVD iteration")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--power-iters", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"ratio {args.ratio}, {args.iters} iterations, useful rate {args.rate_gflops} GFLOP/s")
    for name, (layers, hidden, inter, q, kv) in MODELS.items():
        flops = layers * args.iters * sum(
            iteration_flops(d1, d2, args.ratio, args.power_iters)
            for d1, d2 in projection_shapes(hidden, inter, q, kv))
        hours = flops / (args.rate_gflops * 1e9) / 3600
        print(f"{name:>14}: {flops / 1e15:9.2f} PFLOP useful -> {hours:10.1f} h "
              f"({hours * 60:.0f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
