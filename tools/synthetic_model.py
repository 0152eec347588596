"""A compressed model with random factors of the exact shapes the pipeline would write,
for runtime benchmarks (memory and speed do not depend on the factor values).

    python tools/synthetic_model.py --dense DIR --out OUT [--support free|2:4|block64]
    python tools/synthetic_model.py --llama8b-stack DENSE_OUT --out OUT ...

``--llama8b-stack DIR`` first writes a random bf16 Llama with Llama-3-8B's block shapes
(hidden 4096, intermediate 14336, 32 heads, 8 KV heads) and 2 blocks (vocabulary 32000,
not 128256, to keep the embeddings from dominating) and uses it as the dense model.
Factors are written with the pipeline's own writer (storage/factor_files.py) and
assembled with its assembler, so the folder is exactly what ``cospadi compress`` writes
for these shapes, gamma and support.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from cospadi.stages.assemble import assemble_model
from cospadi.stages.build_block import load_skeleton
from cospadi.stages.factors import DictionaryFactors, LowRankFactors
from cospadi.stages.projections import PROJECTIONS
from cospadi.stages.sizing import dictionary_shape, svd_rank
from cospadi.stages.supports import parse_support
from cospadi.storage.factor_files import write_block_factors


def llama8b_stack(path: Path, layers: int = 2) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    return path


def random_factors(d1: int, d2: int, ratio: float, method: str, support: str,
                   g: torch.Generator):
    if method == "svd-llm":
        r = svd_rank(d1, d2, ratio).r
        return LowRankFactors(torch.randn(d1, r, generator=g) * 0.02,
                              torch.randn(r, d2, generator=g) * 0.02)
    shape = dictionary_shape(d1, d2, ratio, 2.0, support)
    k, s = shape.k, shape.s
    kind = parse_support(support)
    if kind.kind == "block":
        per_block = torch.rand(d2 // kind.block, k, generator=g).argsort(dim=1)[:, :s]
        chosen = per_block.sort(dim=1).values.T.repeat_interleave(kind.block, dim=1)
    elif kind.kind == "2:4":
        pairs = torch.rand(d2, k // 4, 4, generator=g).argsort(dim=2)[:, :, :2].sort(dim=2)
        chosen = (pairs.values + 4 * torch.arange(k // 4)[None, :, None]).reshape(d2, s).T
    else:
        chosen = torch.rand(d2, k, generator=g).argsort(dim=1)[:, :s].sort(dim=1).values.T
    return DictionaryFactors(torch.randn(d1, k, generator=g) * 0.02, chosen.contiguous(),
                             torch.randn(s, d2, generator=g) * 0.05, support)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--dense", help="dense model folder")
    source.add_argument("--llama8b-stack", help="write a random 2-block Llama-3-8B-shaped "
                                                "model here and use it")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--method", default="cospadi", choices=("cospadi", "svd-llm"))
    ap.add_argument("--support", default="free")
    args = ap.parse_args(argv)
    dense = Path(args.dense) if args.dense else Path(args.llama8b_stack)
    if args.llama8b_stack and not (dense / "config.json").is_file():
        llama8b_stack(dense)
    skeleton = load_skeleton(dense, "auto")
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for layer in range(skeleton.num_layers):
            factors = {}
            for projection in PROJECTIONS:
                d1, d2 = skeleton.projection_shape(projection)
                name = f"{skeleton.layer_path(layer)}.{projection}"
                factors[name] = random_factors(d1, d2, args.ratio, args.method, args.support,
                                               g)
            path = Path(tmp) / f"block_{layer:04d}.safetensors"
            write_block_factors(path, factors, {"synthetic": True})
            files.append(path)
        assemble_model(dense, files, args.out, overwrite=True)
    print(f"synthetic compressed model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
