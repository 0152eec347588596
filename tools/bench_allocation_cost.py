"""CPU seconds per block: the allocation pass (curves, sensitivity) against the factor pass.

    python tools/bench_allocation_cost.py --base RUN.work [--blocks 0,15,29]
        [--ratios 0.2,0.3,0.4] [--sensitivity-samples 32,8] [--extra '--iters 5']

``--base``: a finished ``cospadi compress --keep-work`` run of the demo model (its Grams
and block inputs; calibration 32 x 256 as ``tools/bench_allocation.py``). For each block
and ratio it runs the pipeline's own tasks in a scratch work directory whose ``grams``
and ``activations`` link to the base's: ``curves`` (whitening, spectrum, ladder and the
calibrating short solve) of a CoSpaDi ``--allocation global --allocation-weight loss``
run, its ``sensitivity`` task (an inner block: the gradient of its output is a stand-in
of the stored shape, which costs the same), and a uniform ``factor`` task with the
compress defaults (closed solver, 15 steps, up to 20 least-squares rounds) or ``--extra``.
CPU seconds of the process (``time.process_time``, one torch thread): robust to the other
jobs of a shared machine, unlike wall time. Prints a table and the ratio
(curves + sensitivity) / factor per block and summed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from fetch_assets import DEFAULT_DEST  # noqa: E402
from reproduce import floats  # noqa: E402

from cospadi.pipeline.allocation_tasks import run_curves  # noqa: E402
from cospadi.pipeline.cli import config_from_args, parse  # noqa: E402
from cospadi.pipeline.sensitivity_tasks import grad_path, run_sensitivity  # noqa: E402
from cospadi.pipeline.tasks import Job, run_factor  # noqa: E402
from cospadi.stages.calib_data import calibration_set  # noqa: E402
from cospadi.storage.activation_store import ActivationReader, write_activations  # noqa: E402


def make_job(args: list[str], model: Path, work: Path, layers: int) -> Job:
    cfg = config_from_args(parse(["compress", "--model", str(model), "--out",
                                  str(work / "out"), "--work-dir", str(work), "--device",
                                  "cpu", "--keep-work", *args]))
    return Job(config=cfg, model_dir=str(model), work_root=str(work), out=str(work / "out"),
               num_layers=layers, groups=tuple((layer,) for layer in range(layers)),
               device="cpu", dtype=cfg.resolved_dtype())


def cpu(fn, *args) -> float:
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def stand_in_gradient(job: Job, layer: int, samples: int) -> None:
    """A gradient store for the output of ``layer`` (what sensitivity-(layer+1) writes)."""
    source = ActivationReader(job.work.activations(layer))
    g = torch.Generator().manual_seed(layer)
    with write_activations(grad_path(job, layer + 1), (samples, *source.shape[1:]),
                           job.torch_dtype, job.config.micro_batch) as sink:
        for lo in range(0, samples, job.config.micro_batch):
            hi = min(lo + job.config.micro_batch, samples)
            sink.write(lo, torch.randn(hi - lo, *source.shape[1:], generator=g))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--assets", default=str(DEFAULT_DEST))
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--ratios", type=floats, default=[0.2, 0.3, 0.4])
    ap.add_argument("--sensitivity-samples", default="32,8")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--extra", default="", help="more compress flags of the factor task")
    opts = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, model = Path(opts.base).resolve(), Path(opts.assets) / "model"
    layers = len(list((base / "grams").glob("block_*.zarr")))
    blocks = [int(b) for b in opts.blocks.split(",")]
    common = ["--calib-text", str(Path(opts.assets) / "calib.txt"),
              "--calib-samples", str(opts.calib_samples), "--seq-len", str(opts.seq_len),
              "--method", "cospadi", "--rho", "2", "--seed", "42", "--torch-threads", "1"]
    calib_cfg = config_from_args(parse(["compress", "--model", str(model), "--out",
                                        str(base.parent / "unused"), *common]))
    ids = calibration_set(calib_cfg, model).ids  # the top block's labels, tokenised once
    rows, totals = [], {}
    for ratio in opts.ratios:
        for block in blocks:
            with tempfile.TemporaryDirectory(dir=base.parent) as tmp:
                work = Path(tmp)
                (work / "done").mkdir()
                for sub in ("grams", "activations"):
                    (work / sub).symlink_to(base / sub, target_is_directory=True)
                flags = [*common, "--ratio", str(ratio)]
                glob = make_job([*flags, "--allocation", "global", "--allocation-weight",
                                 "loss"], model, work, layers)
                row = {"ratio": ratio, "block": block,
                       "curves": cpu(run_curves, glob, block)}
                for samples in opts.sensitivity_samples.split(","):
                    job = make_job([*flags, "--allocation", "global", "--allocation-weight",
                                    "loss", "--sensitivity-samples", samples], model, work,
                                   layers)
                    stand_in_gradient(job, block, int(samples))
                    row[f"sens{samples}"] = cpu(run_sensitivity, job, block, ids)
                    shutil.rmtree(work / "done")
                    (work / "done").mkdir()
                row["factor"] = cpu(run_factor, make_job([*flags, *opts.extra.split()],
                                                         model, work, layers), block)
            rows.append(row)
            for key, value in row.items():
                if key not in ("ratio", "block"):
                    totals[(ratio, key)] = totals.get((ratio, key), 0.0) + value
            print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.items()), flush=True)
    print(f"\nCPU seconds, blocks {opts.blocks}, one thread; factor: uniform CoSpaDi "
          f"{opts.extra or '(compress defaults)'}")
    print("| gamma | curves | " + " | ".join(f"sensitivity ({s} windows)" for s in
                                             opts.sensitivity_samples.split(","))
          + " | factor | allocation / factor |")
    print("|---" * (4 + len(opts.sensitivity_samples.split(","))) + "|")
    for ratio in opts.ratios:
        sens = [totals[(ratio, f"sens{s}")] for s in opts.sensitivity_samples.split(",")]
        factor = totals[(ratio, "factor")]
        ratios = " / ".join(f"{(totals[(ratio, 'curves')] + s) / factor:.2f}" for s in sens)
        print(f"| {ratio:g} | {totals[(ratio, 'curves')]:.1f} | "
              + " | ".join(f"{s:.1f}" for s in sens) + f" | {factor:.1f} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
