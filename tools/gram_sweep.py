"""Many compressions from one calibration capture (the reproduce protocol, less capture).

    python tools/gram_sweep.py --base RUN.work --ratios 0.2,0.3
        --methods svd-llm,masa-g2,masa-g4,masa-g6,cospadi,cospadi-g2
        [--targets q_proj,k_proj,v_proj,o_proj] [--iters 1 --omp-atoms-per-step 8]
        [reproduce.py's other options] --name smollm2_attention

With ``--propagate original`` every method factorises the same Grams (those of the dense
model's blocks), so a sweep over methods, ratios and group sizes need not capture them
again: on the shared 2-core CPU a capture of SmolLM2's 30 blocks takes ~10 min, an SVD-LLM
or MASA factorisation of its attention about one. ``--base`` is the work directory of a
finished ``cospadi compress --keep-work`` run with the same model, calibration text and
calibration settings (checked against its manifest). Each variant gets its own work
directory whose ``grams`` links to the base's, and runs the pipeline's own factor and
assemble tasks (``pipeline/tasks.py``) on them; then ``cospadi eval`` and ``cospadi
inspect`` exactly as ``tools/reproduce.py`` does, and a record in its format under
``RUNS`` (so ``reproduce.py --report-only`` reads them too). A record's compute time is
the base's capture time plus the variant's factor and assembly time.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import reproduce  # noqa: E402

from cospadi.pipeline.config import make_config  # noqa: E402
from cospadi.pipeline.manifest import WorkDir, model_fingerprint  # noqa: E402
from cospadi.pipeline.tasks import Job, run_assemble, run_factor  # noqa: E402
from cospadi.stages.build_block import load_skeleton  # noqa: E402
from cospadi.stages.compress_block import plan_groups  # noqa: E402
from cospadi.storage.atomic import write_json  # noqa: E402

CAPTURE_SETTINGS = ("calib_samples", "seq_len", "micro_batch", "attn_implementation", "dtype",
                    "propagate")


def check_base(base: Path, model: Path, calib: Path, settings: dict) -> float:
    """Refuse a base whose Grams are not this protocol's; return its capture seconds."""
    manifest = json.loads((base / "manifest.json").read_text())["fingerprint"]
    content = hashlib.sha256(calib.read_text(encoding="utf-8").encode("utf-8")).hexdigest()
    if manifest["model"] != model_fingerprint(model) or \
            manifest["calibration"].get("content") != content:
        raise SystemExit(f"{base}: captured from another model or calibration text")
    for key in CAPTURE_SETTINGS:
        if manifest["settings"].get(key) != settings[key]:
            raise SystemExit(f"{base}: {key} {manifest['settings'].get(key)!r}, this sweep "
                             f"needs {settings[key]!r}")
    work = WorkDir(base)
    layers = load_skeleton(model).num_layers
    missing = [layer for layer in range(layers) if not work.grams(layer).exists()]
    if missing:
        raise SystemExit(f"{base}: Grams of blocks {missing} are gone (run it with --keep-work)")
    done = [json.loads(p.read_text()) for p in work.done_dir.glob("*.json")
            if p.name.startswith(("embed", "capture"))]
    return sum(d.get("seconds", 0.0) for d in done)


def run_variant(run: reproduce.Run, opts, assets: Path, runs: Path, base: Path,
                capture_seconds: float) -> dict:
    record_path = runs / f"{run.name}.json"
    evaluation = {"seq_len": opts.eval_seq_len, "windows": opts.eval_windows}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("evaluation") == evaluation:
            print(f"done already: {run.name}")
            return record
    _, method, group = reproduce.METHODS[run.method]
    out, work = runs / run.name, runs / f"{run.name}.work"
    cfg = make_config(None, dict(
        model=str(assets / "model"), out=str(out), calib_text=str(assets / "calib.txt"),
        method=method, ratio=run.ratio, group_size=group, iters=run.iters, rho=run.rho,
        seed=run.seed, omp_atoms_per_step=run.omp_atoms, calib_samples=run.calib_samples,
        seq_len=run.seq_len, masa_atoms=run.masa_atoms, solver=run.solver, device="cpu",
        support=run.support,
        keep_work=True,
        work_dir=str(work), torch_threads=opts.torch_threads,
        **({} if run.targets == reproduce.ALL_TARGETS else {"targets": run.targets})))
    skeleton = load_skeleton(assets / "model")
    (work / "done").mkdir(parents=True, exist_ok=True)
    if not (work / "grams").exists():
        (work / "grams").symlink_to(base.resolve() / "grams", target_is_directory=True)
    groups = tuple(plan_groups(skeleton.num_layers, cfg.group_size))
    job = Job(config=cfg, model_dir=str(assets / "model"),
              work_root=str(work), out=str(out), num_layers=skeleton.num_layers,
              groups=groups, device="cpu", dtype=cfg.resolved_dtype())
    print(f"$ factor + assemble {run.name} ({len(groups)} groups)", flush=True)
    start = time.perf_counter()
    for index in range(len(groups)):
        run_factor(job, index)
    run_assemble(job)
    seconds = capture_seconds + sum(
        json.loads(p.read_text()).get("seconds", 0.0) for p in (work / "done").glob("*.json"))
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    record = reproduce.score(run, opts, assets, out, seconds)
    record["settings"] += "; Grams of a shared capture (tools/gram_sweep.py)"
    write_json(record_path, record)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--base" not in argv:
        raise SystemExit("--base WORK_DIR is required")
    at = argv.index("--base")
    base = Path(argv[at + 1])
    del argv[at:at + 2]
    opts = reproduce.parse(argv)
    assets, runs = Path(opts.assets), Path(opts.runs)
    runs.mkdir(parents=True, exist_ok=True)
    settings = make_config(None, dict(calib_samples=opts.calib_samples, seq_len=opts.seq_len,
                                      device="cpu")).fingerprint_settings()
    capture = check_base(base, assets / "model", assets / "calib.txt", settings)
    dense = reproduce.dense_ppl(opts, assets, runs)
    print(f"dense perplexity {dense['ppl']:.4f}; base capture {capture:.0f} s", flush=True)
    records = []
    for run in reproduce.planned_runs(opts):
        if run.propagate != "original":
            continue  # compressed propagation needs its own capture
        records.append(run_variant(run, opts, assets, runs, base, capture))
        print(f"{run.name}: ppl {records[-1]['ppl']:.3f}", flush=True)
    reproduce.write_report(records, dense, opts, Path(opts.results))
    print(f"wrote {opts.results}/{opts.name}.md, .png, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
