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

# flag -> (type, help); dest is the config field (dashes -> underscores)
COMPRESS_FLAGS: dict[str, tuple[Any, str]] = {
    "--model": (str, "model directory or hub id"),
    "--out": (str, "output directory (a Hugging Face model folder)"),
    "--method": (str, "cospadi | svd-llm"),
    "--ratio": (float, "compression ratio: fraction of projection parameters removed"),
    "--rho": (float, "atoms per non-zero (k / s)"),
    "--iters": (int, "K-SVD iterations"),
    "--power-iters": (int, "power iterations per atom update"),
    "--omp-atoms-per-step": (int, "1: exact OMP; b > 1: gOMP, b atoms per step (faster)"),
    "--seed": (int, "solver seed"),
    "--group-size": (int, "consecutive blocks sharing q,k,v,gate,up dictionaries"),
    "--support": (str, "free | 2:4 | block<B> (e.g. block64): structure of the codes"),
    "--calib-text": (str, "UTF-8 calibration text file"),
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
    "--shard-size": (str, "largest output shard, e.g. 256MB or 2GB (held in memory once)"),
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

    ev = sub.add_parser("eval", help="perplexity of a model on a text file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--text", required=True)
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--max-windows", type=int, default=None)
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
        print(f"compressed model written to {result.out} in {result.seconds:.1f} s{note}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..stages.calibration import read_text
    from ..stages.evaluate import load_model_for_eval, perplexity

    if not Path(args.model).is_dir():
        raise ConfigError(f"model directory {args.model} does not exist")
    text = read_text(args.text)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_for_eval(args.model, device=device, dtype=args.dtype)
    result = perplexity(model, tokenizer, text, seq_len=args.seq_len,
                        max_windows=args.max_windows, device=device,
                        progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps({"ppl": result["ppl"], "tokens": result["tokens"]}))
    else:
        print(f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens "
              f"({result['windows']} windows of {result['seq_len']})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..stages.assemble import inspect_model

    report = inspect_model(args.model_dir)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    comp, model = report["compressed"], report["model"]
    print(f"compressed projections: kept {comp['kept_params']:.4f} of parameters, "
          f"{comp['kept_bytes']:.4f} of bf16 bytes")
    print(f"whole model: kept {model['kept_params']:.4f} of parameters, "
          f"{model['kept_bytes']:.4f} of bf16 bytes")
    for layer, figures in report["layers"].items():
        print(f"  layer {layer:>4}: params {figures['kept_params']:.4f}, "
              f"bytes {figures['kept_bytes']:.4f}")
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
    from ..stages.assemble import AssembleError
    from ..stages.build_block import ArchitectureError
    from ..stages.calibration import CalibrationError
    from ..storage.factor_files import FactorFileError
    from ..storage.shards import ShardError
    from .manifest import LockHeld, ResumeRefused

    return (ConfigError, ShardError, ArchitectureError, CalibrationError, ResumeRefused,
            LockHeld, FactorFileError, AssembleError, ConnectionError, FileNotFoundError,
            FileExistsError)


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
