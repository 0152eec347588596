"""tools/reproduce.py's report: rows, like-for-like target checks and the plot.

Synthetic records (no compression runs): the report must compare CoSpaDi with SVD-LLM at
the same ratio and calibration, grouped with per-layer only at the same K-SVD setting,
and label rows whose solver setting differs from the common one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import reproduce  # noqa: E402


def record(method: str, ratio: float, ppl: float, iters: int = 1,
           propagate: str = "original") -> dict:
    run = reproduce.Run(method, ratio, propagate, iters=iters, calib_samples=32, seq_len=256,
                        rho=2.0, seed=42, omp_atoms=8)
    label, _, group = reproduce.METHODS[method]
    return {"run": run.name, **run.__dict__, "label": label, "group_size": group,
            "settings": run.settings(), "evaluation": {"seq_len": 512, "windows": 20},
            "ppl": ppl, "eval_tokens": 10220, "eval_seconds": 30.0,
            "compress_seconds": 600.0, "torch_threads": 1, "kept_params": 0.7,
            "kept_bytes": 0.7, "model_kept_params": 0.76, "model_kept_bytes": 0.76}


def test_report_compares_like_with_like(tmp_path) -> None:
    records = [record("svd-llm", 0.3, 90.0), record("svd-llm", 0.4, 170.0),
               record("cospadi", 0.3, 80.0), record("cospadi", 0.4, 160.0),
               record("cospadi-g2", 0.3, 85.0),
               record("cospadi", 0.3, 79.0, propagate="compressed"),
               record("cospadi", 0.3, 40.0, iters=4)]
    dense = {"ppl": 15.0, "seconds": 60.0, "seq_len": 512, "tokens": 10220, "windows": 20}
    opts = argparse.Namespace(torch_threads=1, rho=2.0, seed=42, notes=None)
    reproduce.write_report(records, dense, opts, tmp_path)

    text = (tmp_path / "smollm2.md").read_text()
    targets = json.loads((tmp_path / "smollm2.json").read_text())["targets"]
    # 1-iteration per layer at 0.3: 80 / 90 = 0.89 > 0.5
    assert any("gamma 0.3: CoSpaDi per layer 80.00 / SVD-LLM 90.00 = 0.89" in t
               and "MISSED" in t for t in targets)
    # the 4-iteration row is a labelled variant, checked against SVD-LLM on its own
    assert any("4 K-SVD it 40.00 / SVD-LLM 90.00 = 0.44" in t and "met" in t
               for t in targets)
    # grouped (1 it) is compared with per layer (1 it), never with the 4-iteration row
    assert any("groups of 2 85.00 vs per layer 80.00" in t and "MISSED" in t
               for t in targets)
    assert not any("groups of 2 85.00 vs per layer 40.00" in t for t in targets)
    assert any("propagate compressed 79.00 vs original 80.00" in t for t in targets)
    assert "| CoSpaDi per layer, 4 K-SVD it | 0.3 | 40.00 | 0.44 |" in text
    assert text.count("\n| ") == len(records) + 1  # header + one row per record
    assert (tmp_path / "smollm2.png").stat().st_size > 10_000


def test_compute_time_counts_interrupted_attempts(tmp_path) -> None:
    """A resumed run's last attempt may be short; its tasks' done records are not."""
    r = record("cospadi", 0.3, 80.0)
    r["compress_seconds"] = 120.0  # the last attempt only
    done = tmp_path / f"{r['run']}.work" / "done"
    done.mkdir(parents=True)
    for i, seconds in enumerate([300.0, 250.5, 10.0]):
        (done / f"task{i}.json").write_text(json.dumps({"task": f"t{i}", "seconds": seconds}))
    patched = reproduce.with_task_seconds(r, tmp_path)
    assert patched["task_seconds"] == 560.5
    assert reproduce.compute_seconds(patched) == 560.5
    assert reproduce.compute_seconds(reproduce.with_task_seconds(r, tmp_path / "none")) == 120.0


def test_zero_shot_columns(tmp_path) -> None:
    tasks = ["piqa", "arc_easy"]
    records = [record("svd-llm", 0.3, 90.0), record("cospadi", 0.3, 80.0)]
    records[0]["zero_shot"] = {"piqa": 0.60, "arc_easy": 0.40}
    records[1]["zero_shot"] = {"piqa": 0.62, "arc_easy": None}  # a task that gave no number
    dense = {"ppl": 15.0, "seconds": 60.0, "seq_len": 512, "tokens": 10220, "windows": 20,
             "zero_shot": {"piqa": 0.70, "arc_easy": 0.50}}
    opts = argparse.Namespace(torch_threads=1, rho=2.0, seed=42, notes=None, tasks=tasks)
    reproduce.write_report(records, dense, opts, tmp_path)
    text = (tmp_path / "smollm2.md").read_text()
    assert "| compute time | piqa | arc_easy | mean |" in text
    assert "| dense | 0 | 15.00 |" in text and "| 0.7000 | 0.5000 | 0.6000 |" in text
    assert "| 0.6000 | 0.4000 | 0.5000 |" in text  # SVD-LLM row, mean of both
    assert "| 0.6200 | - | - |" in text  # no mean over a missing task
    assert reproduce.primary_metric({"acc,none": 0.3, "acc_norm,none": 0.4}) == 0.4
    assert reproduce.primary_metric({"acc,none": 0.3, "acc_stderr,none": 0.1}) == 0.3
    assert reproduce.primary_metric({"word_perplexity,none": 12.5, "alias": "x"}) == 12.5
