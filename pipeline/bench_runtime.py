"""``cospadi bench-runtime DIR``: memory and speed of a compressed model against its dense
original, loaded the way a user loads them (``from_pretrained``, ``trust_remote_code``).

Each model is measured in its own child process (so its RSS is its own): weights
resident (distinct tensor storages of parameters, buffers and any tensor a module keeps),
process RSS after load and after generating, prefill tokens/s (one forward of batch x 512
tokens, last-token logits, best of ``repeats``) and greedy decode tokens/s (batch 1,
``new_tokens`` after a 32-token prompt, minus the prompt's own forward). Models alternate
(dense, compressed, dense, ...) so that a busy machine slows both alike. The dense
original is ``--dense DIR``, or else written from the compressed one (``export-dense``:
same architecture and shapes, W = D S).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = 32


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def held_bytes(model) -> dict[str, int]:
    """Bytes of distinct storages: all weights, and those of the projections alone."""
    import torch

    def storages(module, recurse: bool) -> dict[int, int]:
        out: dict[int, int] = {}
        tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
        for sub in (module.modules() if recurse else [module]):
            tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
        return out

    projections: dict[int, int] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"):
            projections.update(storages(module, True))
    return {"weights": sum(storages(model, True).values()),
            "projections": sum(projections.values())}


def disk_bytes(model_dir: Path) -> int:
    """Bytes of all tensors in a folder's safetensors shards."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                numel = 1
                for dim in sl.get_shape():
                    numel *= dim
                total += numel * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I16": 2,
                                  "I32": 4, "I64": 8}[sl.get_dtype()]
    return total


def measure(model_dir: str, device: str, dtype: str, threads: int, batches: list[int],
            seq: int, new_tokens: int, repeats: int) -> dict:
    """One model's figures (runs in the child process)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    rss0 = _rss()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 trust_remote_code=True).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {"rss_before_load": rss0, "rss_after_load": _rss(), "held_after_load":
           held_bytes(model), "disk": disk_bytes(Path(model_dir))}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(vocab, (batch, seq), generator=g).to(device)
            best = float("inf")
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                sync()
                best = min(best, time.perf_counter() - start)
            out[f"prefill_{batch}x{seq}_tok_s"] = batch * seq / best
        prompt = torch.randint(vocab, (1, PROMPT), generator=g).to(device)
        best_gen, best_one = float("inf"), float("inf")
        for _ in range(repeats):
            for steps in (1, new_tokens):
                sync()
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, pad_token_id=0)
                sync()
                took = time.perf_counter() - start
                if steps == 1:
                    best_one = min(best_one, took)
                else:
                    best_gen = min(best_gen, took)
        out["decode_tok_s"] = (new_tokens - 1) / max(best_gen - best_one, 1e-9)
    out["rss_after_generate"] = _rss()
    out["held_after_generate"] = held_bytes(model)
    return out


def _child(args: argparse.Namespace, model_dir: str, device: str) -> dict:
    cmd = [sys.executable, "-m", "cospadi.pipeline.bench_runtime", model_dir, "--child",
           "--device", device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--seq", str(args.seq), "--new-tokens", str(args.new_tokens),
           "--repeats", "1", "--batches", *map(str, args.batches)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model_dir} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for run in runs[1:]:
        for key, value in run.items():
            if key.endswith("_tok_s"):
                out[key] = max(out[key], value)
            elif key.startswith("rss_"):
                out[key] = min(out[key], value)
    return out


def bench(args: argparse.Namespace) -> dict:
    import torch

    from ..stages.assemble import export_dense

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = args.dense
        if dense_dir is None:
            dense_dir = str(Path(tmp) / "dense")
            export_dense(args.model_dir, dense_dir)
        result: dict = {"model": str(args.model_dir), "dense": args.dense or "export-dense",
                        "dtype": args.dtype, "threads": args.threads, "devices": {}}
        for device in devices:
            runs: dict[str, list[dict]] = {"dense": [], "compressed": []}
            for _ in range(args.repeats):
                for name, path in (("dense", dense_dir), ("compressed", str(args.model_dir))):
                    runs[name].append(_child(args, path, device))
                    print(f"{device} {name}: done", file=sys.stderr)
            result["devices"][device] = {name: _best(r) for name, r in runs.items()}
    return result


def report(result: dict) -> str:
    mib = 1 << 20
    lines = []
    for device, pair in result["devices"].items():
        dense, comp = pair["dense"], pair["compressed"]
        lines.append(f"{device}, {result['dtype']}, {result['threads']} thread(s):")
        lines.append(f"{'':34}{'dense':>12}{'compressed':>12}{'ratio':>8}")

        def row(label, a, b, fmt="{:.1f}", scale=1.0):
            ratio = b / a if a else float("nan")
            lines.append(f"{label:34}{fmt.format(a / scale):>12}{fmt.format(b / scale):>12}"
                         f"{ratio:>8.3f}")

        row("tensor bytes on disk (MiB)", dense["disk"], comp["disk"], scale=mib)
        for moment in ("after_load", "after_generate"):
            row(f"weights resident {moment} (MiB)", dense[f"held_{moment}"]["weights"],
                comp[f"held_{moment}"]["weights"], scale=mib)
            row(f"  projections {moment} (MiB)", dense[f"held_{moment}"]["projections"],
                comp[f"held_{moment}"]["projections"], scale=mib)
        row("process RSS after load (MiB)", dense["rss_after_load"], comp["rss_after_load"],
            scale=mib)
        row("process RSS after generate (MiB)", dense["rss_after_generate"],
            comp["rss_after_generate"], scale=mib)
        for key in sorted(k for k in dense if k.endswith("_tok_s")):
            row(key.replace("_tok_s", " tokens/s"), dense[key], comp[key])
        held = comp["held_after_generate"]["weights"]
        lines.append(f"compressed weights resident / its tensor bytes on disk: "
                     f"{held / comp['disk']:.4f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="compressed model folder")
    parser.add_argument("--dense", help="its dense original (default: export-dense of it)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                        help="prefill batch sizes")
    parser.add_argument("--seq", type=int, default=512, help="prefill tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy decode tokens")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per model")
    parser.add_argument("--json", help="also write the figures here")


def run(args: argparse.Namespace) -> int:
    if not Path(args.model_dir, "config.json").is_file():
        print(f"cospadi: error: {args.model_dir} is not a model folder (no config.json)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = bench(args)
    result["seconds"] = time.perf_counter() - start
    print(report(result))
    if args.json:
        from ..storage.atomic import write_json

        write_json(Path(args.json), result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one model, one device, in this process: print its figures as JSON
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(json.dumps(measure(args.model_dir, args.device, args.dtype, args.threads,
                                 args.batches, args.seq, args.new_tokens, args.repeats)))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
