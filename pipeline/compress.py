"""``cospadi compress`` end to end: preflight checks, plan, lock, manifest, graph, output."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..stages.build_block import ModelSkeleton, load_skeleton
from ..stages.calibration import calibration_ids, load_tokenizer, read_text
from ..stages.compress_block import plan_groups
from ..storage.durable_dir import remove_stale_temps, remove_tree
from ..storage.shards import ShardError, ShardReader
from .config import CompressConfig, ConfigError
from .graph import build_graph, execute, reconcile, task_order
from .manifest import WorkDir, WorkLock, done_tasks, fingerprint, open_manifest
from .plan import format_plan, make_plan
from .tasks import ASSEMBLE, Job

log = logging.getLogger("cospadi")


@dataclass
class CompressResult:
    out: Path | None
    ran: int  # tasks run now
    skipped: int  # tasks already done by an earlier (interrupted) run
    seconds: float


def resolve_model(model: str) -> Path:
    """A local directory as is; anything else is tried as a Hugging Face hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ShardError(f"model directory {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - any hub failure means the same to the user
        raise ShardError(f"model directory {model} does not exist and it could not be "
                         f"fetched from the hub: {str(err).splitlines()[0]}") from err


def check_shapes(skeleton: ModelSkeleton, reader: ShardReader) -> None:
    """Every decoder layer's tensors present with the shapes the config implies (headers)."""
    reader.validate_headers()
    meta_layers = skeleton.base.layers
    for index in range(skeleton.num_layers):
        path = skeleton.layer_path(index)
        for key, value in meta_layers[index].state_dict().items():
            name = f"{path}.{key}"
            if name not in reader:
                raise ShardError(f"checkpoint in {reader.model_dir} lacks tensor {name}")
            got = reader.shape(name)
            if got != tuple(value.shape):
                raise ShardError(f"tensor {name} in {reader.shard_of(name).name} has shape "
                                 f"{got}, the model config expects {tuple(value.shape)}")


def check_settings(cfg: CompressConfig, skeleton: ModelSkeleton) -> None:
    layers = skeleton.num_layers
    if cfg.group_size > layers:
        raise ConfigError(f"group-size {cfg.group_size} is larger than the model's depth "
                          f"({layers} blocks)")
    if cfg.support.startswith("block"):
        from ..stages.projections import PROJECTIONS

        block = int(cfg.support[len("block"):])
        for projection in PROJECTIONS:
            d2 = skeleton.projection_shape(projection)[1]
            if d2 % block:
                raise ConfigError(f"support {cfg.support}: {projection} has {d2} outputs, "
                                  f"not a multiple of the block size {block}")
    context = getattr(skeleton.config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise ConfigError(f"seq-len {cfg.seq_len} is longer than the model's context "
                          f"({context} tokens)")
    device = cfg.resolved_device()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} requested but CUDA is not available")


def check_calibration(cfg: CompressConfig, model_dir: Path) -> Path:
    if not cfg.calib_text:
        raise ConfigError("calib-text is required (a UTF-8 text file of calibration prose)")
    path = Path(cfg.calib_text)
    # tokenising up front fails fast on text too short for samples x seq_len
    calibration_ids(read_text(path), load_tokenizer(model_dir), cfg.calib_samples,
                    cfg.seq_len, source=f"calibration text {path}")
    return path


def check_output(out: Path, assembled: bool) -> None:
    """Refuse to overwrite a folder that is not an earlier cospadi output."""
    if assembled or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    config = out / "config.json"
    try:
        ours = "cospadi" in json.loads(config.read_text())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ConfigError(f"output directory {out} exists and is not a cospadi output; "
                          "remove it or choose another --out")


def preflight(cfg: CompressConfig) -> tuple[Path, ModelSkeleton, ShardReader]:
    if not cfg.model:
        raise ConfigError("--model is required")
    model_dir = resolve_model(cfg.model)
    reader = ShardReader(model_dir)
    skeleton = load_skeleton(model_dir, cfg.attn_implementation)
    check_shapes(skeleton, reader)
    check_settings(cfg, skeleton)
    return model_dir, skeleton, reader


def dry_run(cfg: CompressConfig) -> str:
    _, skeleton, reader = preflight(cfg)
    return format_plan(cfg, make_plan(cfg, skeleton, reader))


def compress(cfg: CompressConfig, restart: bool = False, progress: bool = True
             ) -> CompressResult:
    start = time.perf_counter()
    if not cfg.out:
        raise ConfigError("--out is required")
    work = WorkDir(cfg.work_path)
    lock = WorkLock(work.lock)
    if work.root.is_dir():
        lock.acquire()  # another run there: refuse at once, not after the slow checks
    try:
        model_dir, skeleton, reader = preflight(cfg)
        calib = check_calibration(cfg, model_dir)
        groups = tuple(plan_groups(skeleton.num_layers, cfg.group_size))
        out = Path(cfg.out)
        current = fingerprint(model_dir, calib, cfg.fingerprint_settings())
        if not lock.held:
            lock.acquire()
        if lock.previous.get("pid"):  # released locks are emptied: that run was killed
            log.info("run %s on %s ended without releasing %s; taking over",
                     lock.previous["pid"], lock.previous.get("host", "?"), work.root)
        resumed = open_manifest(work, current, restart)
        stale = remove_stale_temps(work.root)
        if stale:
            log.info("removed %d partial writes left by an interrupted run", len(stale))
        done = done_tasks(work)
        if ASSEMBLE in done and not out.is_dir():
            done.discard(ASSEMBLE)  # output removed since: assemble again
            (work.done_record(ASSEMBLE)).unlink()
        check_output(out, assembled=ASSEMBLE in done)
        job = Job(config=cfg, model_dir=str(model_dir), calib_text=str(calib),
                  work_root=str(work.root), out=str(out), num_layers=skeleton.num_layers,
                  groups=groups, device=cfg.resolved_device(), dtype=cfg.resolved_dtype())
        done = reconcile(job, done)
        order = task_order(job)
        pending = [name for name in order if name not in done]
        if resumed:
            log.info("resuming %s: %d of %d tasks already done", work.root,
                     len(order) - len(pending), len(order))
        nodes = build_graph(job, done)
        bar = tqdm(total=len(order), initial=len(order) - len(pending), desc="compress",
                   unit="task", disable=not progress)
        with logging_redirect_tqdm(loggers=[log]), bar:
            execute(job, nodes, lambda name: bar.update(1))
        if not cfg.keep_work:
            remove_tree(work.root / "activations")
            remove_tree(work.root / "grams")
    finally:
        lock.release()
    return CompressResult(out, len(pending), len(order) - len(pending),
                          time.perf_counter() - start)

