"""Quality comparison on SmolLM2-135M: SVD-LLM vs CoSpaDi (per layer and grouped).

    python tools/reproduce.py [--ratios 0.2,0.3,0.4] [--methods svd-llm,cospadi,cospadi-g2]
        [--iters 60] [--calib-samples 256] [--seq-len 1024]
        [--eval-seq-len 512] [--eval-windows 0] [--torch-threads N]
        [--propagation-ratio 0.3] [--runs runs/reproduce] [--results results]
        [--tasks piqa,hellaswag,... [--num-fewshot N] [--task-limit N] [--lm-eval-args S]]

For every (method, ratio) it runs ``cospadi compress`` on the demo assets (same
calibration text, samples and seed for every method) into ``RUNS/<run name>``, then
``cospadi eval`` (perplexity on the held-out text, non-overlapping windows) and
``cospadi inspect`` (achieved kept fraction of parameters and bytes). With ``--tasks`` each
model (and the dense one) is also scored by lm-evaluation-harness (``cospadi eval
--tasks``), and the report gains one zero-shot column per task (acc_norm where the task
has it, else acc) and their mean. At
``--propagation-ratio`` it also runs CoSpaDi per layer with ``--propagate compressed``
next to the default ``original``. The defaults are the paper's (256 x 1024 calibration
tokens, 60 K-SVD iterations, whole evaluation text); a CPU run passes smaller values and
the report states exactly what each row used.

Resumable: a run whose record ``RUNS/<run name>.json`` exists is skipped; an interrupted
compression resumes where it stopped (the pipeline checkpoints every task). Run names
contain every setting that changes the result, so runs with other settings never mix.
Records accumulate: the report covers every finished run under RUNS that the current
``--ratios``/``--methods`` select (``--report-all``: every record, whatever its settings).

Writes ``RESULTS/smollm2.md`` (table), ``RESULTS/smollm2.png`` (perplexity against
compression ratio, log scale, dense as a horizontal line) and ``RESULTS/smollm2.json``
(``--name`` changes the stem). ``--targets q_proj,k_proj,v_proj,o_proj`` compresses the
attention projections only (every method; the others stay dense); ``masa-g2/g4/g6`` are
MASA with groups of 2, 4 and 6 blocks (``--masa-atoms`` S).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from fetch_assets import DEFAULT_DEST, fetch_assets  # noqa: E402

from cospadi.storage.atomic import write_json, write_text  # noqa: E402

# method key -> (label, cospadi compress method, group size)
METHODS = {
    "svd-llm": ("SVD-LLM", "svd-llm", 1),
    "cospadi": ("CoSpaDi per layer", "cospadi", 1),
    "cospadi-g2": ("CoSpaDi groups of 2", "cospadi", 2),
    "masa-g2": ("MASA groups of 2", "masa", 2),
    "masa-g4": ("MASA groups of 4", "masa", 4),
    "masa-g6": ("MASA groups of 6", "masa", 6),
}
ALL_TARGETS = "all"
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
PAPER = {"iters": 60, "calib_samples": 256, "seq_len": 1024}


@dataclass(frozen=True)
class Run:
    method: str  # key of METHODS
    ratio: float
    propagate: str
    iters: int
    calib_samples: int
    seq_len: int
    rho: float
    seed: int
    omp_atoms: int = 1  # 1: exact OMP (the paper's); b > 1: gOMP, b atoms per step
    solver: str = "ksvd"  # ksvd (names of earlier records unchanged) | closed
    targets: str = ALL_TARGETS  # projections compressed ("all" or a comma-separated list)
    masa_atoms: int | str = 1  # MASA's S, or "auto"
    support: str = "free"  # CoSpaDi's code structure (free | 2:4 | block<B>)

    @property
    def name(self) -> str:
        it = ""
        if METHODS[self.method][1] == "cospadi":
            it = f"-it{self.iters}" + (f"-gomp{self.omp_atoms}" if self.omp_atoms > 1 else "")
            if self.solver == "closed":
                it = f"-closed-it{self.iters}"
            if self.support != "free":
                it += "-sup" + self.support.replace(":", "of")
        if METHODS[self.method][1] == "masa":
            it = f"-S{self.masa_atoms}"
        scope = "" if self.targets == ALL_TARGETS else \
            "-t" + ("attn" if self.targets == ATTENTION else self.targets.replace(",", "+"))
        return (f"{self.method}-r{self.ratio:g}-{self.propagate}{it}{scope}"
                f"-c{self.calib_samples}x{self.seq_len}-rho{self.rho:g}-s{self.seed}")

    def compress_args(self) -> list[str]:
        _, method, group = METHODS[self.method]
        extra = [] if self.targets == ALL_TARGETS else ["--targets", self.targets]
        if method == "masa":
            extra += ["--masa-atoms", str(self.masa_atoms)]
        if method == "cospadi":
            extra += ["--solver", self.solver, "--support", self.support]
        return ["--method", method, "--ratio", str(self.ratio), "--group-size", str(group),
                "--propagate", self.propagate, "--iters", str(self.iters),
                "--calib-samples", str(self.calib_samples), "--seq-len", str(self.seq_len),
                "--rho", str(self.rho), "--seed", str(self.seed),
                "--omp-atoms-per-step", str(self.omp_atoms), *extra]

    def settings(self) -> str:
        omp = "exact OMP" if self.omp_atoms == 1 else f"gOMP {self.omp_atoms} atoms/step"
        kind = METHODS[self.method][1]
        solver = (f"K-SVD {self.iters} it, {omp}, rho {self.rho:g}" if kind == "cospadi"
                  else (f"S = {self.masa_atoms} atoms" if self.masa_atoms != "auto" else
                        "S per group (0 .. m - 1)") + " + whitened SVD" if kind == "masa"
                  else "SVD")
        if kind == "cospadi" and self.solver == "closed":
            solver = f"closed-form solver {self.iters} it, rho {self.rho:g}"
        if kind == "cospadi" and self.support != "free":
            solver += f", {self.support} supports"
        scope = "" if self.targets == ALL_TARGETS else f"; targets {self.targets}"
        return (f"{solver}; calib {self.calib_samples}x{self.seq_len}; "
                f"propagate {self.propagate}{scope}")


def cli(args: list[str], threads: int, quiet: bool = False) -> subprocess.CompletedProcess:
    """``cospadi ARGS`` in a child process (own memory; threads bounded by the env)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "cospadi.pipeline.cli", *(["-q"] if quiet else []), *args]
    print("$ cospadi " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"cospadi {args[0]} failed with status {proc.returncode}")
    return proc


def evaluate(model_dir: Path, text: Path, seq_len: int, windows: int, threads: int) -> dict:
    args = ["eval", "--model", str(model_dir), "--text", str(text), "--seq-len", str(seq_len),
            "--device", "cpu", "--json"]
    if windows:
        args += ["--max-windows", str(windows)]
    start = time.perf_counter()
    out = cli(args, threads, quiet=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)  # ppl, tokens
    windows = result["tokens"] // (seq_len - 1)
    result.update(seq_len=seq_len, windows=windows, seconds=round(time.perf_counter() - start, 1))
    return result


def evaluation_key(opts: argparse.Namespace) -> dict:
    """What a record was scored with (a record scored otherwise is evaluated again)."""
    key = {"seq_len": opts.eval_seq_len, "windows": opts.eval_windows}
    if opts.tasks:
        key.update(tasks=list(opts.tasks), num_fewshot=opts.num_fewshot,
                   task_limit=opts.task_limit, lm_eval_args=opts.lm_eval_args)
    return key


def primary_metric(metrics: dict) -> float | None:
    """acc_norm where the task reports it (the harness's length-normalised choice), else
    acc, else its first other number (e.g. word_perplexity)."""
    for key in ("acc_norm,none", "acc,none"):
        if key in metrics:
            return metrics[key]
    numbers = [v for k, v in metrics.items() if "," in k and "stderr" not in k
               and isinstance(v, (int, float))]
    return numbers[0] if numbers else None


def zero_shot(model_dir: Path, opts: argparse.Namespace) -> dict[str, float | None]:
    """One number per requested task from ``cospadi eval --tasks`` ({} without --tasks)."""
    if not opts.tasks:
        return {}
    args = ["eval", "--model", str(model_dir), "--tasks", ",".join(opts.tasks), "--device",
            "cpu", "--json"]
    if opts.num_fewshot is not None:
        args += ["--num-fewshot", str(opts.num_fewshot)]
    if opts.task_limit:
        args += ["--limit", str(opts.task_limit)]
    if opts.lm_eval_args:
        args += ["--model-args", opts.lm_eval_args]
    if opts.include_path:
        args += ["--include-path", opts.include_path]
    out = cli(args, opts.torch_threads, quiet=True).stdout.strip().splitlines()[-1]
    results = json.loads(out)["lm_eval"]["results"]
    return {task: primary_metric(results.get(task, {})) for task in opts.tasks}


def run_one(run: Run, opts: argparse.Namespace, assets: Path, runs: Path) -> dict:
    record_path = runs / f"{run.name}.json"
    evaluation = evaluation_key(opts)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("evaluation") == evaluation:
            print(f"done already: {run.name}")
            return record
    out = runs / run.name
    partial = runs / f"{run.name}.seconds"  # compression time of interrupted attempts
    before = float(partial.read_text()) if partial.is_file() else 0.0
    start = time.perf_counter()
    try:
        cli(["compress", "--model", str(assets / "model"), "--out", str(out),
             "--calib-text", str(assets / "calib.txt"), "--torch-threads",
             str(opts.torch_threads), "--device", "cpu", *run.compress_args()],
            opts.torch_threads, quiet=opts.quiet)
    finally:
        write_text(partial, f"{before + time.perf_counter() - start:.1f}")
    seconds = float(partial.read_text())
    record = score(run, opts, assets, out, seconds)
    write_json(record_path, record)
    partial.unlink(missing_ok=True)
    return record


def score(run: Run, opts: argparse.Namespace, assets: Path, out: Path, seconds: float) -> dict:
    """Evaluate and inspect a compressed model: the run's record."""
    evaluation = {"seq_len": opts.eval_seq_len, "windows": opts.eval_windows}
    ppl = evaluate(out, assets / "eval.txt", opts.eval_seq_len, opts.eval_windows,
                   opts.torch_threads)
    sizes = json.loads(cli(["inspect", str(out), "--json"], opts.torch_threads).stdout)
    record = {
        "run": run.name, **asdict(run), "label": METHODS[run.method][0],
        "group_size": METHODS[run.method][2], "settings": run.settings(),
        "evaluation": evaluation, "ppl": ppl["ppl"], "eval_tokens": ppl["tokens"],
        "eval_seconds": ppl["seconds"], "compress_seconds": round(seconds, 1),
        "torch_threads": opts.torch_threads,
        "kept_params": sizes["compressed"]["kept_params"],
        "kept_bytes": sizes["compressed"]["kept_bytes"],
        "model_kept_params": sizes["model"]["kept_params"],
        "model_kept_bytes": sizes["model"]["kept_bytes"],
    }
    if opts.tasks:
        record["zero_shot"] = zero_shot(out, opts)
    return record


def with_task_seconds(record: dict, runs: Path) -> dict:
    """Add the compression's compute time summed over its tasks' done records: unlike the
    wall time of the last attempt it also counts tasks finished by interrupted attempts."""
    done = runs / f"{record['run']}.work" / "done"
    seconds = [json.loads(p.read_text()).get("seconds", 0.0) for p in done.glob("*.json")]
    if seconds:
        record = {**record, "task_seconds": round(sum(seconds), 1)}
    return record


def compute_seconds(record: dict) -> float:
    return max(record["compress_seconds"], record.get("task_seconds", 0.0))


def dense_ppl(opts: argparse.Namespace, assets: Path, runs: Path) -> dict:
    path = runs / f"dense-eval{opts.eval_seq_len}x{opts.eval_windows or 'all'}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        result.setdefault("seq_len", opts.eval_seq_len)
        result.setdefault("windows", result["tokens"] // (opts.eval_seq_len - 1))
        return result
    result = evaluate(assets / "model", assets / "eval.txt", opts.eval_seq_len,
                      opts.eval_windows, opts.torch_threads)
    write_json(path, result)
    return result


def dense_zero_shot(opts: argparse.Namespace, assets: Path, runs: Path,
                    compute: bool = True) -> dict:
    if not opts.tasks:
        return {}
    key = evaluation_key(opts)
    path = runs / "dense-zero-shot.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("evaluation") == key:
        return cached["zero_shot"]
    if not compute:
        return {}
    scores = zero_shot(assets / "model", opts)
    write_json(path, {"evaluation": key, "zero_shot": scores})
    return scores


def planned_runs(opts: argparse.Namespace) -> list[Run]:
    common = dict(iters=opts.iters, calib_samples=opts.calib_samples, seq_len=opts.seq_len,
                  rho=opts.rho, seed=opts.seed, omp_atoms=opts.omp_atoms_per_step,
                  targets=opts.targets, masa_atoms=opts.masa_atoms, solver=opts.solver,
                  support=opts.support)
    runs = [Run(method, ratio, "original", **common)
            for ratio in opts.ratios for method in opts.methods]
    if opts.propagation_ratio is not None and "cospadi" in opts.methods:
        runs.append(Run("cospadi", opts.propagation_ratio, "compressed", **common))
    return runs


# ---------------------------------------------------------------- report


def fmt_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _calib(r: dict) -> tuple[int, int]:
    return r["calib_samples"], r["seq_len"]


def _solver(r: dict) -> tuple[int, int]:
    """Solver iterations and OMP atoms per step ((0, 0) for SVD-LLM and MASA; atoms 0: the
    closed-form solver, which has no OMP)."""
    if not _is_cospadi(r):
        return (0, 0)
    return (r["iters"], 0 if r.get("solver") == "closed" else r.get("omp_atoms", 1))


def _is_cospadi(r: dict) -> bool:
    return METHODS[r["method"]][1] == "cospadi"


def _solver_text(it: int, b: int) -> str:
    if b == 0:
        return f"closed-form solver, {it} iterations"
    return (f"{it} K-SVD iteration{'s' if it > 1 else ''} "
            f"({'exact OMP' if b == 1 else f'gOMP, {b} atoms per step'})")


def _base_solver(records: list[dict]) -> tuple[int, int]:
    """The K-SVD setting most CoSpaDi rows share (others are labelled as variants)."""
    keys = [_solver(r) for r in records if _is_cospadi(r)]
    return max(set(keys), key=keys.count) if keys else (0, 0)


def _variant(r: dict, base: tuple[int, int]) -> str:
    """Label suffix of a row whose solver setting differs from the common one (MASA: S)."""
    if METHODS[r["method"]][1] == "masa":
        return f", S = {r.get('masa_atoms', 1)}"
    if not _is_cospadi(r) or _solver(r) == base:
        return ""
    it, b = _solver(r)
    if b == 0:
        return ", closed-form solver"
    return f", {it} K-SVD it" + ("" if b == base[1] else f", OMP {b} atoms/step")


def targets(records: list[dict]) -> list[str]:
    """One line per check the issue asks for (CoSpaDi <= SVD-LLM / 2; grouped <= per layer;
    propagate compressed vs original), each between rows with the same calibration and,
    for CoSpaDi against CoSpaDi, the same K-SVD setting."""
    def find(ref: dict, method: str, propagate: str = "original") -> dict | None:
        for r in records:
            if (r["method"] == method and r["ratio"] == ref["ratio"]
                    and r["propagate"] == propagate and _calib(r) == _calib(ref)
                    and r.get("targets", ALL_TARGETS) == ref.get("targets", ALL_TARGETS)
                    and (METHODS[method][1] != "cospadi" or _solver(r) == _solver(ref))):
                return r
        return None

    lines = []
    base = _base_solver(records)
    for per in sorted((r for r in records if r["method"] == "cospadi"
                       and r["propagate"] == "original"),
                      key=lambda r: (_solver(r) != base, _solver(r), r["ratio"])):
        g, v = f"gamma {per['ratio']:g}", _variant(per, base)
        svd = find(per, "svd-llm")
        if svd:
            q = per["ppl"] / svd["ppl"]
            lines.append(f"- {g}: CoSpaDi per layer{v} {per['ppl']:.2f} / SVD-LLM "
                         f"{svd['ppl']:.2f} = {q:.2f} (target <= 0.50: "
                         f"{'met' if q <= 0.5 else 'MISSED'})")
        grp = find(per, "cospadi-g2")
        if grp:
            ok = grp["ppl"] <= per["ppl"]
            lines.append(f"- {g}: CoSpaDi groups of 2{v} {grp['ppl']:.2f} vs per layer "
                         f"{per['ppl']:.2f} (target grouped <= per layer: "
                         f"{'met' if ok else 'MISSED'})")
        comp = find(per, "cospadi", "compressed")
        if comp:
            lines.append(f"- {g}: CoSpaDi per layer{v}, propagate compressed "
                         f"{comp['ppl']:.2f} vs original {per['ppl']:.2f}")
    for masa in sorted((r for r in records if METHODS[r["method"]][1] == "masa"),
                       key=lambda r: (r["method"], r["ratio"])):
        g, label = f"gamma {masa['ratio']:g}", METHODS[masa["method"]][0] + _variant(masa, base)
        svd = find(masa, "svd-llm")
        if svd:
            q = masa["ppl"] / svd["ppl"]
            lines.append(f"- {g}: {label} {masa['ppl']:.2f} / SVD-LLM {svd['ppl']:.2f} = "
                         f"{q:.2f} (target MASA below SVD-LLM: "
                         f"{'met' if q < 1 else 'MISSED'})")
    for grp in sorted((r for r in records if r["method"] == "cospadi-g2"
                       and r["propagate"] == "original"), key=lambda r: r["ratio"]):
        rows = [r for r in records if METHODS[r["method"]][1] == "masa"
                and r["ratio"] == grp["ratio"] and _calib(r) == _calib(grp)
                and r.get("targets", ALL_TARGETS) == grp.get("targets", ALL_TARGETS)]
        if rows:
            best = min(rows, key=lambda r: r["ppl"])
            lines.append(f"- gamma {grp['ratio']:g}: CoSpaDi groups of 2{_variant(grp, base)} "
                         f"{grp['ppl']:.2f} vs best MASA ({METHODS[best['method']][0]}"
                         f"{_variant(best, base)}) "
                         f"{best['ppl']:.2f}")
    return lines


def _zero_shot_cells(scores: dict, tasks: list[str]) -> str:
    values = [scores.get(t) for t in tasks]
    cells = "".join(f" {v:.4f} |" if v is not None else " - |" for v in values)
    known = [v for v in values if v is not None]
    return cells + (f" {sum(known) / len(known):.4f} |" if len(known) == len(tasks) else " - |")


def write_report(records: list[dict], dense: dict, opts: argparse.Namespace,
                 results: Path) -> None:
    order = list(METHODS)
    tasks = list(getattr(opts, "tasks", None) or [])
    base = _base_solver(records)
    records = sorted(records, key=lambda r: (order.index(r["method"]), _solver(r) != base,
                                             _solver(r), r["propagate"] != "original",
                                             r["ratio"]))
    svd = {(r["ratio"], _calib(r)): r["ppl"] for r in records if r["method"] == "svd-llm"}
    evaluation = (f"{dense['windows']} windows of {dense['seq_len']} tokens "
                  f"({dense['tokens']} predicted tokens)")
    used = sorted({(*_solver(r), *_calib(r)) for r in records if _is_cospadi(r)})
    calibs = sorted({_calib(r) for r in records})
    paper = (PAPER["iters"], 1, PAPER["calib_samples"], PAPER["seq_len"])
    scopes = sorted({r.get("targets", ALL_TARGETS) for r in records})
    scope = ("q, k, v, o, gate, up, down of every block" if scopes == [ALL_TARGETS] else
             "; ".join("all seven" if t == ALL_TARGETS else t.replace(",", ", ")
                       for t in scopes) + " of every block (the others stay dense)")
    lines = [
        "# SmolLM2-135M-Instruct: SVD-LLM vs CoSpaDi"
        + (" vs MASA" if any(METHODS[r["method"]][1] == "masa" for r in records) else ""),
        "",
        "Generated by `tools/reproduce.py`. Every method ran through the same `cospadi "
        "compress` pipeline on the same calibration text (`assets/calib.txt`, Wikipedia "
        "articles disjoint from the evaluation ones) with the same samples and seed, and "
        "was scored by `cospadi eval` on the same held-out tokens (`assets/eval.txt`, "
        f"{evaluation}, float32 on CPU). Dense perplexity: **{dense['ppl']:.2f}**.",
        "",
        "Settings: calibration " + ", ".join(f"{n} x {t} tokens" for n, t in calibs)
        + "; CoSpaDi " + ", ".join(_solver_text(it, b) for it, b, _, _ in used)
        + (" (the paper's)." if used == [paper] else
           f" (the paper's are {paper[0]} iterations with exact OMP and {paper[2]} x "
           f"{paper[3]} tokens; these runs used less to fit a 2-core CPU budget).")
        + (" Variants with other K-SVD settings are labelled in the method column."
           if len(used) > 1 else ""),
        f"Torch threads {opts.torch_threads}; rho = k/s = {opts.rho:g}; seed {opts.seed}. "
        f"Kept fractions are of the compressed projections ({scope}), parameters and "
        "bytes as stored (bf16 dictionary, 14-bit coefficients, support bit-mask; MASA: bf16 "
        "atoms once per group, float32 coefficients, bf16 corrections); embeddings and "
        "norms are not compressed. Compute time is "
        "`cospadi compress` alone (calibration capture, Grams, solver, assembly), summed "
        "over its tasks so that runs resumed after an interruption count every attempt's "
        "finished work.",
        "",
        "| method | gamma | ppl | ppl / SVD-LLM | kept params | kept bytes | settings "
        "| compute time |" + "".join(f" {t} |" for t in tasks) + (" mean |" if tasks else ""),
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + bool(tasks)),
    ]
    if tasks:
        lines.append(f"| dense | 0 | {dense['ppl']:.2f} | - | 1 | 1 | - | - |"
                     + _zero_shot_cells(dense.get("zero_shot", {}), tasks))
    for r in records:
        key = (r["ratio"], _calib(r))
        rel = f"{r['ppl'] / svd[key]:.2f}" if key in svd else "-"
        label = r["label"] + _variant(r, base) + (
            ", propagate compressed" if r["propagate"] == "compressed" else "")
        lines.append(f"| {label} | {r['ratio']:g} | {r['ppl']:.2f} | {rel} | "
                     f"{r['kept_params']:.4f} | {r['kept_bytes']:.4f} | {r['settings']} | "
                     f"{fmt_seconds(compute_seconds(r))} |"
                     + (_zero_shot_cells(r.get("zero_shot", {}), tasks) if tasks else ""))
    lines += ["", f"![perplexity against compression ratio]({getattr(opts, 'name', 'smollm2')}"
              ".png)", "",
              "## Targets", "", *targets(records)]
    if opts.notes:
        lines += ["", Path(opts.notes).read_text().rstrip()]
    lines += ["", f"Total compression compute time of the rows above: "
              f"{fmt_seconds(sum(compute_seconds(r) for r in records))}; evaluation: "
              f"{fmt_seconds(sum(r['eval_seconds'] for r in records) + dense['seconds'])}."]
    results.mkdir(parents=True, exist_ok=True)
    stem = getattr(opts, "name", "smollm2")
    write_text(results / f"{stem}.md", "\n".join(lines) + "\n")
    write_json(results / f"{stem}.json", {"dense": dense, "runs": records,
                                          "targets": targets(records)})
    plot(records, dense, results / f"{stem}.png")


def plot(records: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"svd-llm": ("o", "tab:red"), "cospadi": ("s", "tab:blue"),
              "cospadi-g2": ("^", "tab:green"), "masa-g2": ("v", "tab:purple"),
              "masa-g4": ("<", "tab:orange"), "masa-g6": (">", "tab:brown")}
    base = _base_solver(records)
    series: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["method"], r["propagate"], _solver(r), str(r.get("masa_atoms", 1)))
        series.setdefault(key, []).append(r)
    order = list(METHODS)
    for (method, propagate, solver, _), rows in sorted(
            series.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] != "original",
                                       kv[0][2])):
        rows.sort(key=lambda r: r["ratio"])
        marker, color = styles[method]
        label = METHODS[method][0] + _variant(rows[0], base)
        cospadi = METHODS[method][1] == "cospadi"
        main_line = propagate == "original" and (not cospadi or solver == base)
        if cospadi and solver == base:
            label += f", closed solver {base[0]} it" if base[1] == 0 else \
                f", {base[0]} K-SVD it"
        if propagate == "compressed":
            marker, label = "D", f"{label}, propagate compressed"
        elif not main_line:
            marker = "*"
        line = "-" if main_line else ("--" if len(rows) > 1 else "")
        ax.plot([r["ratio"] for r in rows], [r["ppl"] for r in rows],
                marker + line, color=color, label=label,
                markersize=6 if main_line else 9,
                markerfacecolor=None if main_line else "none")
    ax.axhline(dense["ppl"], color="gray", linestyle="--", label=f"dense ({dense['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio gamma (fraction of projection parameters removed)")
    ax.set_ylabel(f"perplexity (held-out Wikipedia, {dense['seq_len']}-token windows)")
    ax.set_title("SmolLM2-135M-Instruct")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def method_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method {bad}; choose from {list(METHODS)}")
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(DEFAULT_DEST))
    ap.add_argument("--runs", default=str(REPO / "runs" / "reproduce"))
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--ratios", type=floats, default=[0.2, 0.3, 0.4])
    ap.add_argument("--methods", type=method_list, default=list(METHODS),
                    help=f"comma-separated from {','.join(METHODS)}")
    ap.add_argument("--propagation-ratio", type=float, default=0.3,
                    help="also run CoSpaDi per layer with --propagate compressed here "
                         "(negative: skip)")
    ap.add_argument("--iters", type=int, default=PAPER["iters"])
    ap.add_argument("--calib-samples", type=int, default=PAPER["calib_samples"])
    ap.add_argument("--seq-len", type=int, default=PAPER["seq_len"],
                    help="calibration tokens per sample")
    ap.add_argument("--omp-atoms-per-step", type=int, default=1,
                    help="1: exact OMP (the paper's); b > 1: gOMP with b atoms per step, "
                         "about b x faster sparse coding, somewhat worse codes")
    ap.add_argument("--targets", default=ALL_TARGETS,
                    help=f"projections every method compresses ({ATTENTION} for attention "
                         "only; default all)")
    ap.add_argument("--masa-atoms", type=lambda t: t if t == "auto" else int(t), default=1,
                    help="MASA's S, or auto (per group the S, 0 included, of least error)")
    ap.add_argument("--solver", default="ksvd", choices=["ksvd", "closed"],
                    help="CoSpaDi's dictionary solver: ksvd (the paper's, these records') or "
                         "closed")
    ap.add_argument("--name", default="smollm2", help="report file stem under RESULTS")
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--support", default="free", help="CoSpaDi: free | 2:4 | block<B>")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="evaluation windows (0: the whole evaluation text)")
    ap.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch/OpenMP threads of every child (default: the usable cores; on "
                         "a CPU shared with other jobs use 1: OpenMP spin-waits under "
                         "oversubscription made K-SVD 3x slower with 2 threads than with 1)")
    ap.add_argument("--tasks", type=lambda t: [x for x in t.split(",") if x], default=[],
                    help="lm-eval tasks scored on every model (zero-shot columns), e.g. the "
                         "paper's piqa,hellaswag,lambada_openai,arc_easy,arc_challenge,sciq,"
                         "race,mmlu (needs the eval extra and the hub)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--task-limit", type=float, default=None,
                    help="lm-eval examples per task (fewer: faster, noisier)")
    ap.add_argument("--lm-eval-args", default=None,
                    help="lm-eval model_args passed through, e.g. max_length=512")
    ap.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    ap.add_argument("--report-all", action="store_true",
                    help="report every finished record under RUNS with this evaluation")
    ap.add_argument("--report-only", action="store_true", help="run nothing, write the report")
    ap.add_argument("--notes", help="markdown file appended to the report")
    ap.add_argument("--quiet", action="store_true", help="no compression progress bars")
    opts = ap.parse_args(argv)
    if opts.propagation_ratio is not None and opts.propagation_ratio < 0:
        opts.propagation_ratio = None
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    assets, runs = Path(opts.assets), Path(opts.runs)
    runs.mkdir(parents=True, exist_ok=True)
    fetch_assets(assets)
    dense = dense_ppl(opts, assets, runs)
    print(f"dense perplexity {dense['ppl']:.4f}", flush=True)
    if opts.tasks:
        dense = {**dense, "zero_shot": dense_zero_shot(opts, assets, runs,
                                                       compute=not opts.report_only)}
    evaluation = evaluation_key(opts)
    records = {}
    for run in planned_runs(opts):
        path = runs / f"{run.name}.json"
        if opts.report_only:
            if path.is_file():
                records[run.name] = json.loads(path.read_text())
            continue
        records[run.name] = run_one(run, opts, assets, runs)
        print(f"{run.name}: ppl {records[run.name]['ppl']:.3f}", flush=True)
    if opts.report_all:
        for path in sorted(runs.glob("*.json")):
            record = json.loads(path.read_text())
            if "run" in record and record.get("evaluation") == evaluation:
                records.setdefault(record["run"], record)
    records = [with_task_seconds(r, runs) for r in records.values()
               if r.get("evaluation") == evaluation]
    if not records:
        print("no finished runs to report")
        return 1
    write_report(records, dense, opts, Path(opts.results))
    print(f"wrote {opts.results}/{opts.name}.md, .png, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
