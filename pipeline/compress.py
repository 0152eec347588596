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
from ..stages.calib_data import CalibrationSet, calibration_set
from ..stages.compress_block import plan_groups
from ..stages.replaceme import PRUNE_SECTION
from ..storage.durable_dir import remove_stale_temps, remove_tree
from ..storage.shards import ShardError, ShardReader
from .config import CompressConfig, ConfigError
from .graph import build_graph, execute, reconcile, task_order
from .manifest import WorkDir, WorkLock, done_tasks, fingerprint, open_manifest
from .plan import format_plan, human, make_plan
from .prune_tasks import PRUNE_WRITE, format_table, prune_dirs, pruned_dir, scan_distances
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
    if cfg.prune_blocks:
        check_pruning(cfg, skeleton)
        layers -= cfg.prune_blocks
    if cfg.group_size > layers:
        raise ConfigError(f"group-size {cfg.group_size} is larger than the model's depth "
                          f"({layers} blocks{' after pruning' if cfg.prune_blocks else ''})")
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


def check_pruning(cfg: CompressConfig, skeleton: ModelSkeleton) -> None:
    from ..stages.replaceme import POST_MLP_NORMS, PruneError, check_prune, has_post_mlp_norm

    try:
        check_prune(skeleton.num_layers, cfg.prune_blocks)
    except PruneError as err:
        raise ConfigError(str(err)) from err
    if cfg.prune_fit != "drop" and has_post_mlp_norm(skeleton.base.layers[0]):
        raise ConfigError(f"prune-fit {cfg.prune_fit} folds its map into mlp.down_proj, but "
                          f"{skeleton.config.model_type} normalises the MLP output "
                          f"({'/'.join(POST_MLP_NORMS)}) before adding it to the residual, so "
                          "no linear map folds exactly; use --prune-fit drop")


def check_calibration(cfg: CompressConfig, model_dir: Path) -> CalibrationSet:
    """The run's calibration set, built once up front (fails fast on bad data); its digest
    enters the fingerprint and its windows go to the embed tasks."""
    if not cfg.calib_text and not cfg.calib_data:
        raise ConfigError("calib-text or calib-data is required (a UTF-8 text file, or a "
                          "dataset: local JSON / JSONL / parquet files or a hub id)")
    return calibration_set(cfg, model_dir)


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
        raw = json.loads(config.read_text())
        ours = "cospadi" in raw or PRUNE_SECTION in raw
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
    if cfg.method == "masa":
        make_plan(cfg, skeleton, reader)  # atoms that leave no room are refused up front
    return model_dir, skeleton, reader


def make_job(cfg: CompressConfig, model_dir: Path, skeleton: ModelSkeleton, work: WorkDir,
             out: Path) -> Job:
    depth = skeleton.num_layers
    common = dict(config=cfg, work_root=str(work.root), out=str(out),
                  device=cfg.resolved_device(), dtype=cfg.resolved_dtype())
    if not cfg.prune_blocks:
        return Job(model_dir=str(model_dir), num_layers=depth,
                   groups=tuple(plan_groups(depth, cfg.group_size)), **common)
    kept = depth - cfg.prune_blocks  # the usual tasks then compress the pruned model
    return Job(model_dir=str(pruned_dir(work)), num_layers=kept,
               groups=tuple(plan_groups(kept, cfg.group_size)), prune_source=str(model_dir),
               source_layers=depth, **common)


def dry_run(cfg: CompressConfig) -> str:
    from .timing import measure_rates, stage_seconds

    model_dir, skeleton, reader = preflight(cfg)
    depth = skeleton.num_layers - cfg.prune_blocks
    lines = []
    if cfg.method != "none":
        plan = make_plan(cfg, skeleton, reader, depth=depth)
        if cfg.torch_threads:  # measured as the tasks will run
            import torch

            torch.set_num_threads(cfg.torch_threads)
        # the disk rate is measured where the output goes (its folder's parent exists or is made)
        rates = measure_rates(cfg.resolved_device(), cfg.resolved_dtype(), cfg.work_path.parent)
        seconds = stage_seconds(plan, cfg, plan.hidden, plan.input_dims, rates,
                                plan.disk["output"])
        lines.append(format_plan(cfg, plan, seconds))
        if cfg.allocation != "uniform":
            from .allocation_tasks import dry_run_allocation

            lines.append(dry_run_allocation(cfg.work_path))
    if not cfg.prune_blocks:
        return "\n".join(lines)
    calibration = check_calibration(cfg, model_dir)
    job = make_job(cfg, model_dir, skeleton, WorkDir(cfg.work_path), Path(cfg.out or "."))
    act = cfg.calib_samples * cfg.seq_len * skeleton.config.hidden_size * \
        (4 if cfg.resolved_dtype() == "float32" else 2)
    disk = f"pruning: at most {cfg.prune_blocks + 4} hidden-state stores on disk while " \
        f"scanning ({human((cfg.prune_blocks + 4) * act)})"
    if cfg.method != "none":
        disk += "; the pruned checkpoint stays in the work directory until assembly"
    lines.append(disk)
    log.info("dry run: streaming the calibration tokens once for the distance table")
    lines.append(format_table(scan_distances(job, calibration.ids), cfg.prune_blocks))
    return "\n".join(lines)


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
        calibration = check_calibration(cfg, model_dir)
        out = Path(cfg.out)
        current = fingerprint(model_dir, calibration.digest, cfg.fingerprint_settings())
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
        final = PRUNE_WRITE if cfg.method == "none" else ASSEMBLE
        if final in done and not out.is_dir():
            done.discard(final)  # output removed since: write it again
            (work.done_record(final)).unlink()
        check_output(out, assembled=final in done)
        job = make_job(cfg, model_dir, skeleton, work, out)
        done = reconcile(job, done)
        order = task_order(job)
        pending = [name for name in order if name not in done]
        if resumed:
            log.info("resuming %s: %d of %d tasks already done", work.root,
                     len(order) - len(pending), len(order))
        nodes = build_graph(job, done, calibration.ids)
        bar = tqdm(total=len(order), initial=len(order) - len(pending), desc="compress",
                   unit="task", disable=not progress)
        with logging_redirect_tqdm(loggers=[log]), bar:
            execute(job, nodes, lambda name: bar.update(1))
        if not cfg.keep_work:
            remove_tree(work.root / "activations")
            remove_tree(work.root / "grams")
            for path in prune_dirs(job):
                remove_tree(path)
    finally:
        lock.release()
    return CompressResult(out, len(pending), len(order) - len(pending),
                          time.perf_counter() - start)

