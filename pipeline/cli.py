"""The ``cospadi`` command: compress, eval, inspect, export-dense, bench-runtime.

User errors (bad settings, bad input files, a held lock, a refused resume, a full disk)
print one line on stderr and exit with status 2; anything else is a bug and keeps its
traceback (status 1).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .config import CompressConfig, ConfigError, make_config

log = logging.getLogger("cospadi")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def int_or_auto(text: str) -> int | str:
    """``auto`` or an integer (argparse names the flag when this raises)."""
    return text if text == "auto" else int(text)


# flag -> (type, help); dest is the config field (dashes -> underscores)
COMPRESS_FLAGS: dict[str, tuple[Any, str]] = {
    "--model": (str, "model directory or hub id"),
    "--out": (str, "output directory (a Hugging Face model folder)"),
    "--method": (str, "cospadi | svd-llm | masa | none (prune only, with --prune-blocks)"),
    "--ratio": (float, "compression ratio: fraction of projection parameters removed"),
    "--rho": (float, "atoms per non-zero (k / s)"),
    "--solver": (str, "closed (default: closed-form, fast) | ksvd (the paper's K-SVD)"),
    "--iters": (int, "solver iterations (default: 15 closed, 60 ksvd)"),
    "--refine-iters": (int, "closed: least-squares rounds on the fixed support"),
    "--power-iters": (int, "ksvd: power iterations per atom update"),
    "--omp-atoms-per-step": (int, "ksvd: 1 exact OMP; b > 1 gOMP, b atoms per step (faster)"),
    "--omp-memory": (str, "ksvd: OMP working memory, e.g. 4GB (default: from free memory)"),
    "--seed": (int, "solver seed"),
    "--group-size": (int, "consecutive blocks sharing q,k,v,gate,up dictionaries"),
    "--targets": (str, "projections to compress, e.g. q_proj,k_proj,v_proj,o_proj "
                       "(default all seven; the others stay dense)"),
    "--masa-atoms": (int_or_auto, "masa: matrix atoms S shared by a group (1 <= S < group "
                     "size), or auto (default): per group the S, 0 included, of least error"),
    "--support": (str, "free | 2:4 | block<B> (e.g. block64): structure of the codes"),
    "--calib-text": (str, "UTF-8 calibration text file"),
    "--calib-data": (str, "calibration dataset: JSON/JSONL/parquet/arrow file(s), a folder, "
                          "or a hub id[:config]"),
    "--calib-split": (str, "split of --calib-data (default train)"),
    "--calib-column": (str, "column of --calib-data: text, or chat messages (default: text, "
                            "else messages)"),
    "--calib-packing": (str, "pack | truncate: --calib-data rows into --seq-len windows"),
    "--bos": (str, "auto | always | never: BOS token at the start of every window"),
    "--calib-samples": (int, "calibration sequences"),
    "--seq-len": (int, "tokens per calibration sequence"),
    "--micro-batch": (int, "sequences per block forward"),
    "--propagate": (str, "original | compressed: inputs of later blocks"),
    "--device": (str, "auto | cpu | cuda | cuda:N"),
    "--dtype": (str, "auto | float32 | bfloat16 | float16 (block compute)"),
    "--attn-implementation": (str, "auto | sdpa | eager"),
    "--work-dir": (str, "work directory (default: OUT.work)"),
    "--scheduler": (str, "dask.distributed scheduler address (default: local threads)"),
    "--workers": (int, "local scheduler threads"),
    "--max-inflight": (int, "groups captured ahead of factorisation"),
    "--torch-threads": (int, "torch intra-op threads per process"),
    "--allocation": (str, "uniform | global: one byte budget spent per matrix where it "
                            "buys most (method and size chosen per matrix) | block: the "
                            "same within each block, blocks keeping their uniform bytes"),
    "--allocation-weight": (str, "global allocation's proxy: relative errors weighted by "
                                   "params | matrices | energy | loss"),
    "--allocation-band": (float, "each matrix's bytes within (1 -/+ B) x its uniform "
                                 "bytes (0: unbounded)"),
    "--sensitivity-samples": (int, "allocation-weight loss: calibration windows the "
                                   "sensitivity pass backpropagates (default: all)"),
    "--shard-size": (str, "largest output shard, e.g. 256MB or 2GB (held in memory once)"),
    "--prune-blocks": (int, "ReplaceMe: remove N consecutive blocks before factorising"),
    "--prune-fit": (str, "lstsq | cosine (fold a linear map, least squares or cosine loss, "
                         "into the block before) | drop"),
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own status)
        raise _ArgumentError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cospadi", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or info logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    comp = sub.add_parser("compress", help="compress a model")
    comp.add_argument("--config", help="YAML file with the same settings (flags override)")
    for flag, (kind, text) in COMPRESS_FLAGS.items():
        comp.add_argument(flag, type=kind, help=text, default=argparse.SUPPRESS)
    comp.add_argument("--keep-work", action="store_true", default=argparse.SUPPRESS,
                      help="keep Grams and activations after use")
    comp.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    comp.add_argument("--restart", action="store_true",
                      help="discard an existing work directory instead of resuming")

    ev = sub.add_parser("eval", help="perplexity on a text file and/or lm-eval tasks")
    ev.add_argument("--model", required=True)
    ev.add_argument("--text", help="UTF-8 text file: perplexity over its windows")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--max-windows", type=int, default=None)
    ev.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                    help="BOS at the start of every window (auto: as the tokenizer does)")
    ev.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated")
    ev.add_argument("--num-fewshot", type=int, default=None)
    ev.add_argument("--limit", type=float, default=None,
                    help="lm-eval: examples per task (a fraction if < 1)")
    ev.add_argument("--model-args", default=None,
                    help="lm-eval's own model_args string, e.g. dtype=float32,max_length=512")
    ev.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    ev.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--json", action="store_true")

    ins = sub.add_parser("inspect", help="achieved kept fraction of a compressed model")
    ins.add_argument("model_dir")
    ins.add_argument("--json", action="store_true")

    exp = sub.add_parser("export-dense", help="write a plain checkpoint with W = D S")
    exp.add_argument("model_dir")
    exp.add_argument("out")

    from .bench_runtime import add_arguments

    bench = sub.add_parser("bench-runtime",
                           help="memory and speed of a compressed model against its dense one")
    add_arguments(bench)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                 for flag in COMPRESS_FLAGS if hasattr(args, flag[2:].replace("-", "_"))}
    if hasattr(args, "keep_work"):
        overrides["keep_work"] = args.keep_work
    return make_config(args.config, overrides)


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress, dry_run

    cfg = config_from_args(args)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    result = compress(cfg, restart=args.restart, progress=not args.quiet)
    if result.ran == 0:
        print(f"nothing to do: {result.out} is complete")
    else:
        note = f" (resumed: {result.skipped} tasks were done)" if result.skipped else ""
        what = "pruned" if cfg.method == "none" else "compressed"
        print(f"{what} model written to {result.out} in {result.seconds:.1f} s{note}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..stages.calibration import read_text

    if not Path(args.model).is_dir():
        raise ConfigError(f"model directory {args.model} does not exist")
    if not args.text and not args.tasks:
        raise ConfigError("eval needs --text FILE (perplexity) and/or --tasks T1,T2 (lm-eval)")
    text = read_text(args.text) if args.text else None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {}
    if text is not None:
        from ..stages.evaluate import load_model_for_eval, perplexity

        model, tokenizer = load_model_for_eval(args.model, device=device, dtype=args.dtype)
        result = perplexity(model, tokenizer, text, seq_len=args.seq_len,
                            max_windows=args.max_windows, device=device,
                            progress=not args.quiet and not args.json, bos=args.bos)
        del model
        report.update(ppl=result["ppl"], tokens=result["tokens"])
        if not args.json:
            print(f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens "
                  f"({result['windows']} windows of {result['seq_len']})")
    if args.tasks:
        from ..stages.lm_eval_runner import run_tasks, summary, table

        results = run_tasks(args.model, args.tasks.split(","), num_fewshot=args.num_fewshot,
                            limit=args.limit, model_args=args.model_args,
                            include_path=args.include_path, device=device,
                            dtype=args.dtype, batch_size=args.batch_size)
        report["lm_eval"] = summary(results)
        if not args.json:
            print(table(results))
    if args.json:
        print(json.dumps(report, default=str))
    return 0


def _read_model_config(model_dir: str) -> dict:
    from pathlib import Path

    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # inspect_model names the problem


def _print_prune(section: dict) -> None:
    from .prune_tasks import format_table

    start, stop = section["removed"]
    print(f"depth pruned (ReplaceMe, fit {section['fit']}): blocks {start}..{stop - 1} of "
          f"{section['original_layers']} removed, mean angular distance "
          f"{section['distance']:.4f}")
    table = {int(n): {int(s): d for s, d in row.items()}
             for n, row in section["distances"].items()}
    print(format_table(table, stop - start))
    params = section.get("params")
    if params:
        print(f"pruned checkpoint: kept {params['kept'] / params['original']:.4f} of the "
              "original's parameters (figures below are relative to the pruned model)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..stages.assemble import inspect_model
    from ..stages.replaceme import PRUNE_SECTION

    config = _read_model_config(args.model_dir)
    prune = config.get(PRUNE_SECTION)
    compressed = prune is None or "cospadi" in config  # pruned only: a plain checkpoint
    report = inspect_model(args.model_dir) if compressed else {}
    if prune is not None:
        report["prune"] = prune
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    if prune is not None:
        _print_prune(prune)
    if not compressed:
        return 0
    comp, model = report["compressed"], report["model"]
    print(f"compressed projections: kept {comp['kept_params']:.4f} of parameters, "
          f"{comp['kept_bytes']:.4f} of bf16 bytes")
    print(f"whole model: kept {model['kept_params']:.4f} of parameters, "
          f"{model['kept_bytes']:.4f} of bf16 bytes")
    for layer, figures in report["layers"].items():
        print(f"  layer {layer:>4}: params {figures['kept_params']:.4f}, "
              f"bytes {figures['kept_bytes']:.4f}")
    diagnosed = {name: m["diagnostics"] for name, m in report["modules"].items()
                 if "diagnostics" in m}
    if diagnosed:
        print("relative whitened functional error ||X (W - W_hat)|| / ||X W|| per projection "
              "(SVD-LLM's at the same budget in brackets):")
        for name, figures in diagnosed.items():
            svd = figures.get("svd_llm_error")
            print(f"  {name}: {figures.get('error', float('nan')):.4f}"
                  + (f" ({svd:.4f})" if svd is not None else ""))
    if "allocation" in report:
        from .allocation_tasks import format_allocation

        print(format_allocation(report["allocation"]))
    return 0


def cmd_export_dense(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..stages.assemble import export_dense

    if Path(args.out).exists():
        raise ConfigError(f"output directory {args.out} already exists")
    export_dense(args.model_dir, args.out)
    print(f"dense checkpoint written to {args.out}")
    return 0


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    from .bench_runtime import run

    return run(args)


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "inspect": cmd_inspect,
            "export-dense": cmd_export_dense, "bench-runtime": cmd_bench_runtime}


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or state, not a bug in cospadi."""
    from ..stages.allocation import AllocationError
    from ..stages.assemble import AssembleError
    from ..stages.build_block import ArchitectureError
    from ..stages.calibration import CalibrationError
    from ..stages.lm_eval_runner import LmEvalError
    from ..storage.factor_files import FactorFileError
    from ..storage.shards import ShardError
    from .manifest import LockHeld, ResumeRefused

    return (ConfigError, ShardError, ArchitectureError, CalibrationError, ResumeRefused,
            LockHeld, FactorFileError, AssembleError, ConnectionError, FileNotFoundError,
            FileExistsError, LmEvalError, AllocationError)


def describe_os_error(err: OSError) -> str:
    where = f" writing {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"out of disk space{where} ({err.strerror}); free some space and run the same "
                "command again to resume")
    return f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cospadi: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except _ArgumentError as err:
        print(f"cospadi: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    _setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cospadi: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(err, user_error_types()):
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if isinstance(err, OSError) and err.errno is not None:
                message = describe_os_error(err)
        elif isinstance(err, OSError) and err.errno is not None:
            message = describe_os_error(err)
        else:
            raise
        print(f"cospadi: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
