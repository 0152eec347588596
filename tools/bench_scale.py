"""A Llama-3-70B-width block through the whole ``cospadi compress`` pipeline, and the
projected time of a whole Llama-3-70B.

Writes a random Llama with Llama-3-70B's widths (hidden 8192, intermediate 28672, 64
heads, 8 KV heads) times ``--scale`` (1.0: the real widths; one block's float64 Grams are
then 8.2 GB, the down_proj one 6.6 GB: check ``free -g``), ``--blocks`` blocks, a small
vocabulary, bf16 shards; runs ``cospadi compress`` on it in a child process and reports
seconds per stage (the pipeline's task records) and the child's peak RSS.

Random weights say nothing about quality, only time and memory. The projection: the
FLOP model of ``pipeline/timing.py`` evaluated with this device's micro-benchmark rates
predicts this run's stages; measured / predicted calibrates it (overheads the FLOP count
misses); the calibrated model then gives a whole Llama-3-70B (80 blocks, full widths,
``--project-calib`` tokens, gamma ``--ratio``) on this CPU, and the uncalibrated model with
the assumed H100 rates below gives one H100:

    python tools/bench_scale.py [--scale 0.125] [--blocks 1] [--solver closed] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline  # noqa: E402

from cospadi.pipeline.config import make_config  # noqa: E402
from cospadi.pipeline.plan import Plan, matrix_plan  # noqa: E402
from cospadi.pipeline.timing import Rates, format_seconds, measure_rates, stage_seconds  # noqa: E402
from cospadi.stages.compress_block import solve_units  # noqa: E402
from cospadi.stages.projections import PROJECTIONS  # noqa: E402

LLAMA3_70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8,
              "layers": 80, "head_dim": 128}

# One H100 SXM (assumed, not measured: no GPU in this session). Dense peaks from NVIDIA's
# datasheet, derated to what large kernels sustain: bf16 tensor 989 -> 600 TFLOP/s for the
# block forward; FP32 matmul at ~TF32-off rate 67 -> 50; FP64 tensor 67 -> 50; an SVD
# (cuSOLVER, m^2 n "units") ~1e12 units/s and a Cholesky ~20 TFLOP/s (factorisations
# reach a fraction of matmul rate); NVMe writes 2 GB/s.
H100 = Rates(matmul_compute=600e12, matmul32=50e12, matmul64=50e12, svd64=1e12,
             cholesky64=20e12, disk_write=2e9)


def widths(scale: float) -> dict[str, int]:
    heads = max(1, round(LLAMA3_70B["heads"] * scale))
    kv = max(1, round(LLAMA3_70B["kv_heads"] * scale))
    while heads % kv:
        kv -= 1
    return {"hidden": heads * LLAMA3_70B["head_dim"],
            "intermediate": round(LLAMA3_70B["intermediate"] * scale / 128) * 128,
            "heads": heads, "kv_heads": kv}


def model_plan(cfg, w: dict[str, int], layers: int) -> Plan:
    """The solve plan of a Llama with widths ``w`` (what make_plan gives, without a file)."""
    hidden, inter, kv = w["hidden"], w["intermediate"], w["kv_heads"] * LLAMA3_70B["head_dim"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    counts: dict[tuple[str, int], int] = {}
    for start in range(0, layers, cfg.group_size):
        members = tuple(range(start, min(start + cfg.group_size, layers)))
        for projection, unit in solve_units(members):
            counts[(projection, len(unit))] = counts.get((projection, len(unit)), 0) + 1
    matrices = []
    for (projection, members), count in sorted(counts.items(),
                                               key=lambda kv: PROJECTIONS.index(kv[0][0])):
        matrix = matrix_plan(cfg, projection, members, *shapes[projection])
        matrix.count = count
        matrices.append(matrix)
    groups = -(-layers // cfg.group_size)
    inputs = {"attn_in": hidden, "o_in": hidden, "mlp_in": hidden, "down_in": inter}
    return Plan(matrices, layers, groups, hidden=hidden, input_dims=inputs)


def stage_groups(seconds: dict[str, float]) -> dict[str, float]:
    """Model stages folded into the pipeline's tasks (capture computes the Grams; the
    factor task whitens and solves)."""
    return {"capture": seconds["capture"] + seconds["grams"],
            "factor": seconds["whitening"] + seconds["solve"], "assembly": seconds["assembly"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 70B widths")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--solver", default="closed")
    parser.add_argument("--method", default="cospadi")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--project-calib", default="256x1024",
                        help="calibration of the projected 70B run, SAMPLESxTOKENS")
    parser.add_argument("--root", help="keep the model and run here (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    w = widths(args.scale)
    bench_pipeline.HIDDEN, bench_pipeline.INTERMEDIATE = w["hidden"], w["intermediate"]
    bench_pipeline.HEADS, bench_pipeline.KV_HEADS = w["heads"], w["kv_heads"]
    bench_pipeline.VOCAB = 1024
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="cospadi-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    model, out, text = root / "model", root / "out", root / "calib.txt"
    for stale in (model, out, root / "out.work"):
        shutil.rmtree(stale, ignore_errors=True)
    disk = bench_pipeline.write_model(model, args.blocks)
    bench_pipeline.write_text(text, args.calib_samples * args.seq_len * 2)
    flags = ["--model", str(model), "--out", str(out), "--calib-text", str(text),
             "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
             "--micro-batch", "4", "--method", args.method, "--solver", args.solver,
             "--ratio", str(args.ratio), "--device", args.device,
             "--torch-threads", str(args.torch_threads), "--keep-work"]
    if args.iters is not None:
        flags += ["--iters", str(args.iters)]
    run = bench_pipeline.measure([sys.executable, "-m", "cospadi.pipeline.cli", "-q",
                                  "compress", *flags])
    measured = {"capture": 0.0, "factor": 0.0, "assembly": 0.0}
    for record in (root / "out.work" / "done").glob("*.json"):
        data = json.loads(record.read_text())
        kind = "assembly" if data["task"] == "assemble" else data["task"].split("-")[0]
        if kind in measured:
            measured[kind] += data.get("seconds", 0.0)

    overrides = {"method": args.method, "solver": args.solver, "ratio": args.ratio,
                 "calib_samples": args.calib_samples, "seq_len": args.seq_len,
                 "iters": args.iters}
    cfg = make_config(None, overrides)
    torch.set_num_threads(args.torch_threads)
    compute = "float32" if args.device == "cpu" else "bfloat16"
    rates = measure_rates(args.device, compute, root)
    output = sum(m.bytes * m.count for m in model_plan(cfg, w, args.blocks).matrices)
    predicted = stage_groups(stage_seconds(model_plan(cfg, w, args.blocks), cfg, w["hidden"],
                                           model_plan(cfg, w, args.blocks).input_dims,
                                           rates, output))
    factor = {k: measured[k] / predicted[k] if predicted[k] > 0 else 1.0 for k in measured}

    samples, tokens = (int(v) for v in args.project_calib.split("x"))
    full = make_config(None, dict(overrides, calib_samples=samples, seq_len=tokens))
    big = model_plan(full, widths(1.0), LLAMA3_70B["layers"])
    big_output = sum(m.bytes * m.count for m in big.matrices)
    cpu = stage_groups(stage_seconds(big, full, big.hidden, big.input_dims, rates, big_output))
    cpu = {k: v * factor[k] for k, v in cpu.items()}
    h100 = stage_groups(stage_seconds(big, full, big.hidden, big.input_dims, H100, big_output))
    report = {"widths": w, "scale": args.scale, "blocks": args.blocks,
              "calibration": f"{args.calib_samples}x{args.seq_len}", "solver": args.solver,
              "model_bytes": disk, "peak_rss": run["peak_rss"], "wall_seconds": run["seconds"],
              "measured_seconds": measured, "predicted_seconds": predicted,
              "measured_over_predicted": factor, "rates": asdict(rates),
              "projected_70b_here_seconds": cpu, "device": args.device,
              "projected_70b_h100_seconds": h100,
              "h100_rates_assumed": asdict(H100), "projection_calibration": args.project_calib}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    gib = 1 << 30
    print(f"Llama-3-70B widths x {args.scale:g}: hidden {w['hidden']}, intermediate "
          f"{w['intermediate']}, {w['heads']} heads / {w['kv_heads']} KV; {args.blocks} "
          f"block(s), {args.calib_samples} x {args.seq_len} tokens, {args.solver}; peak RSS "
          f"{run['peak_rss'] / gib:.2f} GiB, wall {format_seconds(run['seconds'])}")
    for stage in measured:
        print(f"  {stage:>9}: measured {format_seconds(measured[stage])}, FLOP model "
              f"{format_seconds(predicted[stage])} (x{factor[stage]:.2f})")
    print(f"rates here: matmul32 {rates.matmul32 / 1e9:.1f} GFLOP/s, matmul64 "
          f"{rates.matmul64 / 1e9:.1f}, SVD {rates.svd64 / 1e9:.2f} G units/s")
    for name, proj in ((f"this {args.device}", cpu), ("one H100 (assumed rates)", h100)):
        print(f"projected Llama-3-70B, gamma {args.ratio}, {args.project_calib} tokens, on "
              f"{name}: {format_seconds(sum(proj.values()))} = "
              + ", ".join(f"{k} {format_seconds(v)}" for k, v in proj.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
