"""Zero-/few-shot accuracy with lm-evaluation-harness (``cospadi eval --tasks``).

The model folder is loaded by lm-eval's own ``hf`` model (``trust_remote_code`` on, so
compressed folders load through their modeling file); ``model_args`` is lm-eval's own
``key=value,...`` string and wins over the defaults set here. lm-eval is an optional
dependency (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("cospadi")

# the paper's zero-shot set (CoSpaDi, Table 1), for the README and tools/reproduce.py
PAPER_TASKS = ("piqa", "hellaswag", "lambada_openai", "arc_easy", "arc_challenge", "sciq",
               "race", "mmlu")


class LmEvalError(ValueError):
    """lm-eval missing, an unknown task or bad arguments (the message says which)."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise LmEvalError("cospadi eval --tasks needs lm-evaluation-harness: "
                          "pip install -e \".[eval]\" (or pip install lm_eval)") from err
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm-eval's TaskManager; with ``include_path`` holding every task asked for, the
    built-in index (~15k YAML files, ~20 s to scan) is skipped."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LmEvalError(f"include path {include_path} is not a directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise LmEvalError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with "
                          "`lm-eval ls tasks`; local YAML tasks need --include-path)")
    return manager


def model_args_string(model_dir: str | Path, dtype: str, user: str | None) -> str:
    """Ours first, the user's after: lm-eval keeps the last value of a repeated key."""
    ours = f"pretrained={model_dir},trust_remote_code=True,dtype={dtype}"
    return f"{ours},{user}" if user else ours


def run_tasks(model_dir: str | Path, tasks: Sequence[str], *, num_fewshot: int | None = None,
              limit: float | None = None, model_args: str | None = None,
              include_path: str | None = None, device: str = "cpu", dtype: str = "float32",
              batch_size: int = 1, log_samples: bool = False, seed: int = 0
              ) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model_dir``; returns lm-eval's result dictionary."""
    lm_eval = _lm_eval()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise LmEvalError("--tasks is empty")
    if not Path(model_dir).is_dir():
        raise LmEvalError(f"model directory {model_dir} does not exist")
    manager = task_manager(tasks, include_path)
    args = model_args_string(model_dir, dtype, model_args)
    log.info("lm-eval: %s on %s (%s)", ",".join(tasks), model_dir, args)
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=args, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
            device=device, batch_size=batch_size, task_manager=manager,
            log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except (TypeError, ValueError, KeyError) as err:  # lm-eval's answer to bad model_args
        raise LmEvalError(f"lm-eval refused the run: {str(err).splitlines()[0]}") from err
    if results is None:  # non-zero ranks in lm-eval's distributed mode
        return {}
    return results


def table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table (plus the groups table when tasks form groups)."""
    from lm_eval.utils import make_table

    out = make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of lm-eval's results (metrics, shots, versions)."""
    keep = ("results", "groups", "n-shot", "versions", "higher_is_better", "n-samples")
    return {key: results[key] for key in keep if key in results}
