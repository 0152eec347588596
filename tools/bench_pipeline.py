"""Does the streaming pipeline keep memory and time per block flat as models get deeper?

Writes random Llama checkpoints of one width (hidden 1024, intermediate 2816) at several
depths straight to bf16 shards (one block per shard, never the whole model in memory),
runs ``cospadi compress`` on the CPU for each in a fresh process, and reports that
process's peak RSS and seconds per block, next to the peak RSS of a bare interpreter that
has only imported torch and transformers (measured in the same run).

Targets (issue 3): peak RSS grows < 10 % from 8 to 32 blocks; for 32 blocks the RSS above
the bare interpreter is < 1/3 of the model's size on disk; seconds per block do not grow.

    python tools/bench_pipeline.py [--depths 8 32] [--method svd-llm] [--json]

Few calibration tokens and the cheap solver by default, so it runs in minutes: what is
measured is the pipeline (streaming, capture, storage, scheduling), not the solver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 4, 32000


def _config(layers: int) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=257, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    return config.to_dict()


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257, "<unk>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def _linear(generator: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    scale = in_features ** -0.5
    return (torch.randn(out_features, in_features, generator=generator) * scale).bfloat16()


def write_model(path: Path, layers: int, seed: int = 0) -> int:
    """A random Llama checkpoint, one shard per block; returns its size on disk in bytes."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    weight_map: dict[str, str] = {}
    shards = layers + 1
    total = 0

    def save(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += (path / name).stat().st_size

    save(0, {"model.embed_tokens.weight":
             (torch.randn(VOCAB, HIDDEN, generator=generator)).bfloat16(),
             "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             "lm_head.weight": _linear(generator, VOCAB, HIDDEN)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        save(layer + 1, {
            p + "self_attn.q_proj.weight": _linear(generator, HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": _linear(generator, KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": _linear(generator, KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": _linear(generator, HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": _linear(generator, INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": _linear(generator, INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": _linear(generator, HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        })
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(_config(layers), indent=2))
    _tokenizer(path)
    return total


def write_text(path: Path, chars: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    letters = torch.randint(97, 123, (chars,), generator=generator)
    letters[torch.rand(chars, generator=generator) < 0.18] = 32  # spaces
    path.write_text(bytes(letters.to(torch.uint8).tolist()).decode("ascii"))


WRAPPER = r"""
import os, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True)
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(rss, seconds, proc.returncode)
sys.stderr.write(proc.stderr[-3000:])
"""


def measure(argv: list[str]) -> dict:
    """Peak RSS (ru_maxrss of exactly one child process) and wall time of ``argv``."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True,
                          text=True)
    rss, seconds, code = proc.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{proc.stderr}")
    return {"peak_rss": int(rss), "seconds": float(seconds)}


def block_seconds(work: Path) -> dict[str, float]:
    """Task seconds from the done records (capture, factor) and the process's peak RSS when
    the last task before assembly finished."""
    out: dict[str, float] = {"capture": 0.0, "factor": 0.0, "peak_before_assembly": 0}
    for record in (work / "done").glob("*.json"):
        data = json.loads(record.read_text())
        for kind in ("capture", "factor"):
            if data["task"].startswith(kind):
                out[kind] += data.get("seconds", 0.0)
        if data["task"] != "assemble":
            out["peak_before_assembly"] = max(out["peak_before_assembly"],
                                              data.get("peak_rss_so_far", 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--root", help="keep the models and runs here (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="cospadi-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    text = root / "calib.txt"
    write_text(text, args.calib_samples * args.seq_len * 2)
    bare = measure([sys.executable, "-c", "import torch, transformers"])
    # the code the pipeline cannot avoid loading: transformers' modeling stack and ours
    code = measure([sys.executable, "-c", "import torch, transformers; "
                    "from transformers import LlamaForCausalLM; "
                    "import cospadi.pipeline.compress, cospadi.stages.factorize, "
                    "cospadi.stages.assemble"])
    results = []
    for depth in args.depths:
        model = root / f"llama-{depth}"
        if model.exists():
            shutil.rmtree(model)
        disk = write_model(model, depth)
        out = root / f"out-{depth}"
        for stale in (out, root / f"out-{depth}.work"):
            shutil.rmtree(stale, ignore_errors=True)
        run = measure([sys.executable, "-m", "cospadi.pipeline.cli", "-q", "compress",
                       "--model", str(model), "--out", str(out), "--calib-text", str(text),
                       "--calib-samples", str(args.calib_samples), "--seq-len",
                       str(args.seq_len), "--micro-batch", "4", "--method", args.method,
                       "--iters", str(args.iters), "--device", "cpu",
                       "--workers", str(args.workers)])
        tasks = block_seconds(root / f"out-{depth}.work")
        results.append({
            "blocks": depth, "model_bytes": disk, "peak_rss": run["peak_rss"],
            "above_bare": run["peak_rss"] - bare["peak_rss"],
            "above_bare_over_model": (run["peak_rss"] - bare["peak_rss"]) / disk,
            "above_code": run["peak_rss"] - code["peak_rss"],
            "peak_rss_before_assembly": tasks["peak_before_assembly"],
            "seconds": run["seconds"], "seconds_per_block": run["seconds"] / depth,
            "capture_s_per_block": tasks["capture"] / depth,
            "factor_s_per_block": tasks["factor"] / depth,
        })
        shutil.rmtree(model)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # partial results early
    report = {"bare_rss": bare["peak_rss"], "code_rss": code["peak_rss"],
              "method": args.method, "iters": args.iters,
              "calibration": f"{args.calib_samples} x {args.seq_len}",
              "cpu_count": os.cpu_count(), "runs": results}
    if len(results) >= 2:
        first, last = results[0], results[-1]
        report["rss_growth"] = last["peak_rss"] / first["peak_rss"] - 1
        report["s_per_block_growth"] = last["seconds_per_block"] / first["seconds_per_block"] - 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mib = 1 << 20
    print(f"bare interpreter (torch + transformers): {bare['peak_rss'] / mib:.0f} MiB; "
          f"with the modeling and pipeline code imported: {code['peak_rss'] / mib:.0f} MiB; "
          f"{args.method}, {args.iters} iters, {report['calibration']} tokens, "
          f"{os.cpu_count()} CPUs")
    print(f"{'blocks':>6}{'model MiB':>11}{'peak MiB':>10}{'above bare':>12}{'/ model':>9}"
          f"{'above code':>12}{'pre-asm MiB':>12}{'s/block':>9}{'capture':>9}{'factor':>8}")
    for r in results:
        print(f"{r['blocks']:>6}{r['model_bytes'] / mib:>11.0f}{r['peak_rss'] / mib:>10.0f}"
              f"{r['above_bare'] / mib:>12.0f}{r['above_bare_over_model']:>9.3f}"
              f"{r['above_code'] / mib:>12.0f}{r['peak_rss_before_assembly'] / mib:>12.0f}"
              f"{r['seconds_per_block']:>9.2f}{r['capture_s_per_block']:>9.2f}"
              f"{r['factor_s_per_block']:>8.2f}")
    if "rss_growth" in report:
        print(f"peak RSS growth {results[0]['blocks']} -> {results[-1]['blocks']} blocks: "
              f"{100 * report['rss_growth']:+.1f} % (target < 10 %); seconds per block "
              f"{100 * report['s_per_block_growth']:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
