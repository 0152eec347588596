"""Uniform against global budget allocation on SmolLM2-135M, at equal total bytes.

    python tools/bench_allocation.py [--ratios 0.2,0.3,0.4] [--weights params]
        [--calib-samples 32] [--seq-len 256] [--eval-windows 20] [--torch-threads 1]
        [--runs runs/allocation] [--results results] [--scopes global,block]
        [--bands 0,0.5] [--sensitivity REFERENCE.json] [--capture-from WORK]

Same protocol as ``tools/reproduce.py`` (its ``cospadi compress`` / ``eval`` / ``inspect``
helpers, demo assets, CoSpaDi per layer, rho 2, seed 42, perplexity on the first
``--eval-windows`` held-out windows of 512 tokens). For every ratio it compresses once with
``--allocation uniform`` and once with ``--allocation global`` per proxy weighting, then
reports perplexity, the achieved kept bytes, and the time of the allocation pass (curve
tasks + the knapsack) against the factorising pass (factor tasks), both summed from the
runs' task records. Resumable: finished runs keep a record ``RUNS/<name>.json``.

The calibration capture does not depend on the ratio or the allocation, so it runs once:
the first run keeps its work directory (``--keep-work``) and every later run starts from
a work directory seeded with hard links to its Grams and its embed / capture done records
(under a manifest with the later run's own settings), which the pipeline then resumes.
Capture time is therefore reported once, not per run. An allocated run also starts from
the error curves of an earlier allocated run at the same ratio and ``--tag`` (they depend
on neither the proxy weight nor the band); arms weighted by ``loss`` also start from its
block inputs, which their streamed sensitivity tasks read (counted in the allocation pass).

Writes ``RESULTS/allocation.md`` and ``RESULTS/allocation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from fetch_assets import DEFAULT_DEST  # noqa: E402
from reproduce import cli, dense_ppl, evaluate, floats  # noqa: E402

from cospadi.storage.atomic import write_json, write_text  # noqa: E402


def run_name(ratio: float, arm: str, opts: argparse.Namespace) -> str:
    return (f"alloc-{arm}-r{ratio:g}-c{opts.calib_samples}x{opts.seq_len}"
            f"-rho{opts.rho:g}{opts.tag}")


def task_seconds(work: Path) -> dict[str, float]:
    """Seconds per task kind (curves, allocate, factor, capture, ...) from done records."""
    out: dict[str, float] = {}
    for path in (work / "done").glob("*.json"):
        kind = path.name[:-5].partition("-")[0]
        out[kind] = out.get(kind, 0.0) + json.loads(path.read_text()).get("seconds", 0.0)
    return {k: round(v, 2) for k, v in sorted(out.items())}


def seed_work(base: Path, work: Path, compress_args: list[str],
              curves_from: Path | None = None, activations: bool = False) -> None:
    """Start ``work`` from ``base``'s captured Grams (hard links) and capture records, and
    from ``curves_from``'s error curves if given (they depend on neither the proxy weight
    nor the band); with ``activations``, also from its block inputs (hard links: the
    sensitivity tasks of the loss weight read them)."""
    from cospadi.pipeline.cli import config_from_args, parse
    from cospadi.pipeline.compress import check_calibration, resolve_model
    from cospadi.pipeline.manifest import fingerprint

    if work.exists() or not (base / "grams").is_dir():
        return
    cfg = config_from_args(parse(compress_args))
    model_dir = resolve_model(cfg.model)
    current = fingerprint(model_dir, check_calibration(cfg, model_dir).digest,
                          cfg.fingerprint_settings())
    tmp = work.with_name(work.name + ".seed")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base / "grams", tmp / "grams", copy_function=os.link)
    if activations:
        shutil.copytree(base / "activations", tmp / "activations", copy_function=os.link)
    (tmp / "done").mkdir()
    for record in [base / "done" / "embed.json", *(base / "done").glob("capture-*.json")]:
        shutil.copy2(record, tmp / "done" / record.name)
    if curves_from is not None:
        shutil.copytree(curves_from / "curves", tmp / "curves")
        for record in (curves_from / "done").glob("curves-*.json"):
            shutil.copy2(record, tmp / "done" / record.name)
    write_json(tmp / "manifest.json", {"format": "cospadi-work", "version": 1,
                                       "fingerprint": current})
    tmp.rename(work)


def compare_sensitivity(work: Path, reference: Path) -> dict:
    """The streamed a_j against a whole-model reference (tools/sensitivity.py)."""
    ref = json.loads(reference.read_text())["sensitivity"]
    streamed = {}
    for path in (work / "sensitivity").glob("block_*.json"):
        data = json.loads(path.read_text())
        streamed.update({f"{p}@{data['layer']}": v for p, v in data["sensitivity"].items()})
    deviation = [abs(streamed[k] / ref[k] - 1) for k in ref if k in streamed]
    return {"matrices": len(deviation), "max_rel_deviation": max(deviation, default=None)}


def run_one(ratio: float, arm: str, opts: argparse.Namespace, assets: Path,
            runs: Path, base: Path | None) -> dict:
    name = run_name(ratio, arm, opts)
    record_path = runs / f"{name}.json"
    if record_path.is_file():
        print(f"done already: {name}")
        return json.loads(record_path.read_text())
    out = runs / name
    args = ["compress", "--model", str(assets / "model"), "--out", str(out),
            "--calib-text", str(assets / "calib.txt"), "--torch-threads",
            str(opts.torch_threads), "--device", "cpu", "--method", "cospadi",
            "--ratio", str(ratio), "--rho", str(opts.rho), "--seed", "42",
            "--calib-samples", str(opts.calib_samples), "--seq-len", str(opts.seq_len),
            *opts.extra.split()]
    curves_from = None
    if arm != "uniform":
        scope, weight, *band = arm.split("-")
        args += ["--allocation", scope, "--allocation-weight", weight]
        if band:
            args += ["--allocation-band", band[0].removeprefix("b")]
        curves_from = next((p for p in sorted(runs.glob(f"alloc-*-r{ratio:g}-*{opts.tag}.work"))
                            if p.name.endswith(f"{opts.tag}.work") and (p / "done").is_dir()
                            and len(list((p / "done").glob("curves-*.json")))
                            == len(list((p / "done").glob("capture-*.json")))
                            and (p / "curves").is_dir()), None)
    work = runs / f"{name}.work"
    if base is None:
        args.append("--keep-work")  # the shared capture
    else:
        seed_work(base, work, args, curves_from,
                  activations=arm != "uniform" and weight == "loss")
    start = time.perf_counter()
    cli(args, opts.torch_threads, quiet=opts.quiet)
    seconds = time.perf_counter() - start
    ppl = evaluate(out, assets / "eval.txt", opts.eval_seq_len, opts.eval_windows,
                   opts.torch_threads)
    sizes = json.loads(cli(["inspect", str(out), "--json"], opts.torch_threads).stdout)
    record = {"run": name, "ratio": ratio, "arm": arm, "ppl": ppl["ppl"],
              "eval_tokens": ppl["tokens"], "compress_seconds": round(seconds, 1),
              "task_seconds": task_seconds(work),
              "kept_bytes": sizes["compressed"]["kept_bytes"],
              "bytes": sizes["compressed"]["bytes"],
              "kept_params": sizes["compressed"]["kept_params"]}
    if opts.sensitivity and arm != "uniform" and weight == "loss":
        record["sensitivity_vs_reference"] = compare_sensitivity(work, Path(opts.sensitivity))
    allocation = sizes.get("allocation")
    if allocation:
        summary = json.loads((work / "allocation.json").read_text())
        methods: dict[str, int] = {}
        for rec in allocation.values():
            methods[rec["method"]] = methods.get(rec["method"], 0) + 1
        record.update(
            methods=methods, proxy=summary["proxy"], uniform_proxy=summary["uniform_proxy"],
            gap=summary["gap"], budget=summary["budget"], allocated_bytes=summary["bytes"],
            predicted=[rec["predicted"] for rec in allocation.values()],
            achieved=[rec["achieved"] for rec in allocation.values()])
    write_json(record_path, record)
    return record


def report(records: list[dict], dense: dict, opts: argparse.Namespace) -> str:
    lines = ["# Budget allocation on SmolLM2-135M: uniform against global at equal bytes", "",
             f"Per layer, rho {opts.rho:g}, calibration {opts.calib_samples} x "
             f"{opts.seq_len} tokens, perplexity on the first {opts.eval_windows} held-out "
             f"windows of {opts.eval_seq_len} tokens (dense {dense['ppl']:.2f}); "
             f"extra compress flags: `{opts.extra or '-'}`; {opts.torch_threads} torch "
             "thread(s) on a shared 2-core CPU.", "",
             "| gamma | allocation | perplexity | vs uniform | kept bytes | methods "
             "(dict/lowrank/dense) | proxy (uniform) | allocation pass / factor pass |",
             "|---|---|---|---|---|---|---|---|"]
    by_ratio: dict[float, dict[str, dict]] = {}
    for r in records:
        by_ratio.setdefault(r["ratio"], {})[r["arm"]] = r
    for ratio in sorted(by_ratio):
        arms = by_ratio[ratio]
        base = arms.get("uniform")
        for arm in sorted(arms, key=lambda a: (a != "uniform", a)):
            r = arms[arm]
            rel = f"{r['ppl'] / base['ppl']:.3f}x" if base and arm != "uniform" else ""
            t = r["task_seconds"]
            if arm == "uniform":
                methods, proxy = "all at the ratio", ""
                cost = f"- / {t.get('factor', 0):.1f} s"
            else:
                m = r["methods"]
                methods = (f"{m.get('dictionary', 0)}/{m.get('lowrank', 0)}/"
                           f"{m.get('dense', 0)}")
                proxy = f"{r['proxy']:.4f} ({r['uniform_proxy']:.4f})"
                alloc = t.get("curves", 0) + t.get("allocate", 0) + t.get("sensitivity", 0)
                cost = (f"{alloc:.1f} / {t.get('factor', 0):.1f} s = "
                        f"{alloc / max(t.get('factor', 1e-9), 1e-9):.2f}")
            lines.append(f"| {ratio:g} | {arm} | {r['ppl']:.2f} | {rel} | "
                         f"{r['kept_bytes']:.4f} | {methods} | {proxy} | {cost} |")
    lines.append("")
    for r in records:
        pairs = [(p, a) for p, a in zip(r.get("predicted", []), r.get("achieved", []),
                                        strict=True) if p > 0]
        if pairs:
            ratio = sum(a for _, a in pairs) / sum(p for p, _ in pairs)
            lines.append(f"- gamma {r['ratio']:g} {r['arm']}: summed achieved / predicted "
                         f"relative squared error over the {len(pairs)} factorised "
                         f"matrices {ratio:.3f}; allocation gap <= {r['gap']:.2g} "
                         f"(proxy {r['proxy']:.5f}); bytes {r['allocated_bytes']} of "
                         f"{r['budget']}")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(DEFAULT_DEST))
    ap.add_argument("--runs", default=str(REPO / "runs" / "allocation"))
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--ratios", type=floats, default=[0.2, 0.3, 0.4])
    ap.add_argument("--weights", default="params",
                    help="comma-separated proxy weightings of the global arms")
    ap.add_argument("--scopes", default="global",
                    help="comma-separated allocation scopes of the arms: global, block")
    ap.add_argument("--bands", default="0", help="comma-separated --allocation-band values "
                    "of the arms (0: unbounded)")
    ap.add_argument("--sensitivity", help="a whole-model sensitivity.json "
                    "(tools/sensitivity.py, same calibration): the streamed a_j of arms "
                    "weighted by loss are compared with it")
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--extra", default="", help="more compress flags, e.g. '--iters 4'")
    ap.add_argument("--tag", default="", help="run name suffix (other solver settings)")
    ap.add_argument("--capture-from", help="work dir of an earlier run (kept with "
                    "--keep-work, same model and calibration) whose Grams every run reuses")
    ap.add_argument("--name", default="allocation", help="report file stem under RESULTS")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    assets, runs = Path(opts.assets), Path(opts.runs)
    runs.mkdir(parents=True, exist_ok=True)
    dense = dense_ppl(opts, assets, runs)
    arms = ["uniform"] + [f"{scope}-{w}" + (f"-b{b}" if float(b) else "")
                          for scope in opts.scopes.split(",") if scope
                          for w in opts.weights.split(",") if w
                          for b in opts.bands.split(",") if b]
    records = []
    base = Path(opts.capture_from) if opts.capture_from else None
    for ratio in opts.ratios:
        for arm in arms:
            records.append(run_one(ratio, arm, opts, assets, runs, base))
            base = base or runs / f"{records[-1]['run']}.work"
            print(f"gamma {ratio:g} {arm}: ppl {records[-1]['ppl']:.3f}", flush=True)
    results = Path(opts.results)
    write_text(results / f"{opts.name}.md", report(records, dense, opts))
    write_json(results / f"{opts.name}.json", {"dense": dense, "runs": records})
    print(f"wrote {results}/{opts.name}.md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
