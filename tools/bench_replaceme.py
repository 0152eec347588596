"""ReplaceMe on SmolLM2-135M (reproduce protocol): pruning against dropping, against CoSpaDi
at the same removed parameters, and pruning + CoSpaDi splitting one budget.

    python tools/bench_replaceme.py [--blocks 4,6,8] [--splits 3,5,6] [--budget 0.3]
        [--matched 4,8] [--iters 1] [--omp-atoms-per-step 8] [--runs runs/replaceme]

Protocol of ``tools/reproduce.py`` (results/smollm2.md): 32 x 256 calibration tokens from
``assets/calib.txt``, perplexity on the first 20 held-out windows of 512 tokens. Every run
is a ``cospadi compress`` child process (records in RUNS/*.json, skipped when present):

- ``prune-N``: ``--method none --prune-blocks N`` (least squares fit);
- ``drop-N``: the same window simply removed (the checkpoint is written from the prune
  run's chosen window, no second scan);
- ``cospadi-rG``: CoSpaDi alone at the ratio removing as many parameters as N blocks;
- ``split-N``: ``--prune-blocks N`` then CoSpaDi on the remaining blocks, at the ratio that
  makes the total removal ``--budget`` of the projection parameters (N = budget x depth is
  pure pruning, ratio = budget pure CoSpaDi);
- ``calib-pass``: one whole-model forward of the calibration tokens (the time reference).

Writes RESULTS/replaceme.md and RESULTS/replaceme.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from reproduce import cli, evaluate  # noqa: E402

from cospadi.storage.atomic import write_json, write_text  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_params(model: Path) -> tuple[int, int, int]:
    """(depth, projection params per block, all params per block) from the checkpoint."""
    from cospadi.storage.hf_checkpoint import checkpoint_tensors

    tensors = checkpoint_tensors(model)
    depth = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    block0 = {k: v for k, v in tensors.items() if ".layers.0." in k}
    proj = sum(v.numel for k, v in block0.items() if k.split(".")[-2] in PROJ)
    return depth, proj, sum(v.numel for v in block0.values())


def calib_pass_seconds(assets: Path, samples: int, seq_len: int, threads: int) -> float:
    """One whole-model forward (transformers, float32) of the calibration tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from cospadi.stages.calibration import calibration_ids, load_tokenizer, read_text

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    ids = calibration_ids(read_text(assets / "calib.txt"), load_tokenizer(assets / "model"),
                          samples, seq_len)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, samples, 8):
            model.model(ids[lo:lo + 8])  # the decoder stack, no logits
    return time.perf_counter() - start


FORWARD = r"""
import time
cpu0, wall0 = time.process_time(), time.perf_counter()
phases = {}
def phase(name):
    global cpu0, wall0
    cpu, wall = time.process_time(), time.perf_counter()
    phases[name] = {"cpu": cpu - cpu0, "wall": wall - wall0}
    cpu0, wall0 = cpu, wall
import json, sys, torch
from transformers import AutoModelForCausalLM
from cospadi.stages.calibration import calibration_ids, load_tokenizer, read_text
model_dir, text, samples, seq_len, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
phase("import")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
phase("load")
ids = calibration_ids(read_text(text), load_tokenizer(model_dir), int(samples), int(seq_len))
phase("tokenise")
with torch.no_grad():
    for lo in range(0, int(samples), 8):
        model.model(ids[lo:lo + 8])
phase("forward")
print(json.dumps(phases))
"""


def child_cpu(command: list[str], threads: int) -> tuple[float, float, str]:
    """(wall, CPU seconds of the child incl. its own children, stdout)."""
    import resource
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu, proc.stdout


def timing(opts: argparse.Namespace, assets: Path, runs: Path, n: int, rounds: int = 2
           ) -> dict:
    """A prune-only run against one calibration pass, interleaved, two ways.

    (a) process against process: ``cospadi compress --method none --prune-blocks N`` to its
    exit (checkpoint written) against a fresh process that imports torch and transformers,
    loads the model from the same shards, tokenises the same calibration set and runs the
    decoder stack over it once (transformers, float32, 8 samples per forward);
    (b) in task: the scan tasks' CPU seconds against that process's forward alone.
    """
    import shutil

    rows = []
    for index in range(rounds):
        load = os.getloadavg()[0]
        wall, cpu, printed = child_cpu([
            sys.executable, "-c", FORWARD, str(assets / "model"), str(assets / "calib.txt"),
            str(opts.calib_samples), str(opts.seq_len), str(opts.threads)], opts.threads)
        phases = json.loads(printed.strip().splitlines()[-1])
        target, work = runs / f"timing-{index}", runs / f"timing-{index}.work"
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        p_wall, p_cpu, _ = child_cpu([
            sys.executable, "-m", "cospadi.pipeline.cli", "-q", "compress", "--model",
            str(assets / "model"), "--out", str(target), "--calib-text",
            str(assets / "calib.txt"), "--calib-samples", str(opts.calib_samples),
            "--seq-len", str(opts.seq_len), "--torch-threads", str(opts.threads), "--device",
            "cpu", "--method", "none", "--prune-blocks", str(n)], opts.threads)
        tasks = task_cpu(work)
        row = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
               "forward_process": {"wall": wall, "cpu": cpu}, "forward_phases": phases,
               "prune_process": {"wall": p_wall, "cpu": p_cpu}, "prune_tasks": tasks,
               "a_cpu": p_cpu / cpu, "a_wall": p_wall / wall}
        if "scan" in tasks:
            row["b_cpu"] = tasks["scan"]["cpu"] / phases["forward"]["cpu"]
            row["b_wall"] = tasks["scan"]["wall"] / phases["forward"]["wall"]
        print(json.dumps({k: row[k] for k in ("load_before", "a_cpu", "a_wall", "b_cpu",
                                               "b_wall") if k in row}), flush=True)
        rows.append(row)
        write_json(runs / f"timing-{n}.json", {"rounds": rows})  # each round as it ends
    return {"rounds": rows}


def task_cpu(work: Path) -> dict[str, dict[str, float]]:
    """Wall and process CPU seconds per kind of prune task, from the done records."""
    out: dict[str, dict[str, float]] = {}
    for path in (work / "done").glob("prune-*.json"):
        record = json.loads(path.read_text())
        kind = "scan" if path.stem.startswith("prune-scan") else path.stem
        slot = out.setdefault(kind, {"wall": 0.0, "cpu": 0.0})
        slot["wall"] += record.get("seconds", 0.0)
        slot["cpu"] += record.get("cpu_seconds", 0.0)
    return out


def task_seconds(work: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in (work / "done").glob("*.json"):
        name = path.stem
        kind = "scan" if name.startswith("prune-scan") else name.split("-0")[0]
        out[kind] = out.get(kind, 0.0) + json.loads(path.read_text()).get("seconds", 0.0)
    return {k: round(v, 1) for k, v in sorted(out.items())}


def run(name: str, args: list[str], opts: argparse.Namespace, assets: Path,
        runs: Path) -> dict:
    record_path = runs / f"{name}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    out = runs / name
    start = time.perf_counter()
    cli(["compress", "--model", str(assets / "model"), "--out", str(out), "--calib-text",
         str(assets / "calib.txt"), "--calib-samples", str(opts.calib_samples), "--seq-len",
         str(opts.seq_len), "--torch-threads", str(opts.threads), "--device", "cpu",
         "--seed", "42", *args], opts.threads, quiet=True)
    seconds = time.perf_counter() - start
    return finish(name, out, seconds, opts, assets, runs, runs / f"{name}.work")


def finish(name: str, out: Path, seconds: float, opts: argparse.Namespace, assets: Path,
           runs: Path, work: Path | None) -> dict:
    ppl = evaluate(out, assets / "eval.txt", 512, opts.eval_windows, opts.threads)
    sizes = json.loads(cli(["inspect", str(out), "--json"], opts.threads).stdout)
    record = {"run": name, "ppl": ppl["ppl"], "eval_tokens": ppl["tokens"],
              "compress_seconds": round(seconds, 1),
              "tasks": task_seconds(work) if work and work.is_dir() else {},
              "prune": {k: v for k, v in sizes.get("prune", {}).items() if k != "distances"},
              "distances": sizes.get("prune", {}).get("distances"),
              "compressed_kept": sizes.get("compressed", {}).get("kept_params")}
    write_json(runs / f"{name}.json", record)
    return record


def drop_run(prune: dict, n: int, opts: argparse.Namespace, assets: Path, runs: Path) -> dict:
    name = f"drop-{n}"
    if (runs / f"{name}.json").is_file():
        return json.loads((runs / f"{name}.json").read_text())
    from cospadi.stages.prune_checkpoint import write_pruned

    start, stop = prune["prune"]["removed"]
    section = dict(prune["prune"], fit="drop")
    begin = time.perf_counter()
    write_pruned(assets / "model", runs / name, base_prefix="model", start=start,
                 size=stop - start, replaced={}, section=section)
    return finish(name, runs / name, time.perf_counter() - begin, opts, assets, runs, None)


def removed_fraction(record: dict, depth: int, proj: int, block: int) -> float:
    """Fraction of the decoder blocks' parameters removed (pruned blocks + CoSpaDi)."""
    pruned = record.get("prune") or {}
    n = (pruned["removed"][1] - pruned["removed"][0]) if pruned else 0
    kept = record.get("compressed_kept")
    width = (1.0 - kept) * (depth - n) * proj if kept is not None else 0.0
    return (n * block + width) / (depth * block)


def _label(key: str, record: dict) -> str:
    kind, _, n = key.replace("split-svd-llm", "split_svd").partition("-")
    window = record.get("prune", {}).get("removed")
    where = f" (blocks {window[0]}..{window[1] - 1})" if window else ""
    if kind == "prune":
        return f"ReplaceMe, {n} blocks{where}"
    if kind == "drop":
        return f"drop the same {n} blocks{where}"
    if kind == "split":
        return f"ReplaceMe {n} blocks{where} + CoSpaDi gamma {record.get('ratio')}"
    if kind == "split_svd":
        return f"ReplaceMe {n} blocks{where} + SVD-LLM gamma {record.get('ratio')}"
    return f"CoSpaDi gamma {record.get('ratio')} alone"


def solver_words(opts: argparse.Namespace) -> str:
    if opts.solver == "closed":
        return "closed-form solver (its default iterations)"
    return f"{opts.iters} K-SVD iteration(s), gOMP {opts.omp_atoms_per_step} atoms per step"


def report(records: dict[str, dict], dense: dict, depth: int, proj: int, block: int,
           calib: dict, opts: argparse.Namespace) -> str:
    lines = ["# ReplaceMe on SmolLM2-135M-Instruct", "",
             "Generated by `tools/bench_replaceme.py` (reproduce protocol: calibration "
             f"{opts.calib_samples} x {opts.seq_len} tokens of `assets/calib.txt`, perplexity "
             f"on the first {opts.eval_windows} held-out windows of 512 tokens; CoSpaDi "
             f"{solver_words(opts)}, rho 2, seed 42; {opts.threads} torch thread(s) on a "
             "shared CPU). Dense "
             f"perplexity **{dense['ppl']:.2f}**. Removed: fraction of the {depth} decoder "
             "blocks' parameters (embeddings excluded).", "",
             "| run | removed | ppl | compress time |", "|---|---|---|---|"]
    for key, record in records.items():
        lines.append(f"| {_label(key, record)} | "
                     f"{removed_fraction(record, depth, proj, block):.3f} | "
                     f"{record['ppl']:.2f} | {record['compress_seconds']:.0f} s |")
    lines += ["", f"One whole-model forward of the calibration tokens (transformers, same "
              f"threads): {calib['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def stored_records(runs: Path) -> dict[str, dict]:
    """Every finished run under RUNS, keyed as main() keys them, in table order."""
    import re

    found: list[tuple[tuple, str, dict]] = []
    patterns = [(r"prune-(\d+)", "prune", 0), (r"drop-(\d+)", "drop", 1),
                (r"split-(\d+)-r([\d.]+)", "split", 2),
                (r"split-svd-llm-(\d+)-r([\d.]+)", "split-svd-llm", 3),
                (r"cospadi-r([\d.]+)", "cospadi", 4)]
    for path in sorted(runs.glob("*.json")):
        for pattern, kind, rank in patterns:
            match = re.fullmatch(pattern, path.stem)
            if match is None:
                continue
            record = json.loads(path.read_text())
            if kind == "cospadi":
                record["ratio"] = float(match.group(1))
                key, order = f"cospadi-{match.group(1)}", (rank, 0, record["ratio"])
            else:
                if kind.startswith("split"):
                    record["ratio"] = float(match.group(2))
                n = int(match.group(1))
                order = (0, n, rank) if rank < 2 else (rank, n)
                key = f"{kind}-{match.group(1)}"
            found.append((order, key, record))
    return {key: record for _, key, record in sorted(found)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(REPO / "assets"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "replaceme"))
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--blocks", type=ints, default=[4, 6, 8])
    ap.add_argument("--splits", type=ints, default=[3, 6, 5])
    ap.add_argument("--matched", type=ints, default=[4, 8])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--width", default="cospadi", help="cospadi | svd-llm: the split's "
                    "width method")
    ap.add_argument("--solver", default="closed", help="closed | ksvd: CoSpaDi's solver "
                    "(closed: its default iterations; --iters and --omp-atoms-per-step are "
                    "for ksvd)")
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--omp-atoms-per-step", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing", type=int, default=0, help="N: time a prune-only run "
                    "against the calibration forward (interleaved) and exit")
    ap.add_argument("--rounds", type=int, default=2, help="--timing: interleaved rounds")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report every finished run under RUNS")
    ap.add_argument("--only", default="", help="comma list of run kinds: prune,split,matched")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    assets, runs = Path(opts.assets), Path(opts.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if opts.timing:
        result = timing(opts, assets, runs, opts.timing, opts.rounds)
        write_json(runs / f"timing-{opts.timing}.json", result)
        print(json.dumps(result, indent=1))
        return 0
    kinds = set(opts.only.split(",")) if opts.only else {"prune", "split", "matched"}
    depth, proj, block = block_params(assets / "model")
    solver = ["--solver", "closed"] if opts.solver == "closed" else [
        "--solver", "ksvd", "--iters", str(opts.iters), "--omp-atoms-per-step",
        str(opts.omp_atoms_per_step)]
    records: dict[str, dict] = {}
    dense_path = runs / "dense.json"
    if not dense_path.is_file():
        write_json(dense_path, evaluate(assets / "model", assets / "eval.txt", 512,
                                        opts.eval_windows, opts.threads))
    dense = json.loads(dense_path.read_text())
    calib_path = runs / "calib-pass.json"
    if not calib_path.is_file():
        write_json(calib_path, {"seconds": calib_pass_seconds(
            assets, opts.calib_samples, opts.seq_len, opts.threads)})
    pure = round(opts.budget * depth)
    if opts.report_only:
        kinds = set()
    if "prune" in kinds:
        for n in [*opts.blocks, pure]:
            records[f"prune-{n}"] = run(f"prune-{n}", ["--method", "none", "--prune-blocks",
                                                       str(n)], opts, assets, runs)
            records[f"drop-{n}"] = drop_run(records[f"prune-{n}"], n, opts, assets, runs)
    if "split" in kinds:
        for n in opts.splits:
            ratio = round((opts.budget * depth * proj - n * block) / ((depth - n) * proj), 4)
            tag = "" if opts.width == "cospadi" else f"-{opts.width}"
            key = f"split{tag}-{n}"
            records[key] = run(f"split{tag}-{n}-r{ratio:g}", [
                "--method", opts.width, "--prune-blocks", str(n), "--ratio", str(ratio),
                *solver], opts, assets, runs)
            records[key]["ratio"] = ratio
    if "matched" in kinds:
        for n in opts.matched:
            ratio = round(n * block / (depth * proj), 4)
            records[f"cospadi-{n}"] = run(f"cospadi-r{ratio:g}", [
                "--method", "cospadi", "--ratio", str(ratio), *solver], opts, assets, runs)
            records[f"cospadi-{n}"]["ratio"] = ratio
    if opts.report_only:
        records = stored_records(runs)
    write_json(Path(opts.results) / "replaceme.json",
               {"dense": dense, "calib_pass": json.loads(calib_path.read_text()),
                "depth": depth, "block_params": block, "projection_params": proj,
                "runs": records})
    write_text(Path(opts.results) / "replaceme.md", report(records, dense, depth, proj, block,
                                                           json.loads(calib_path.read_text()),
                                                           opts))
    print(json.dumps({k: v["ppl"] for k, v in records.items()}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
