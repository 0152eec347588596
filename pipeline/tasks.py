"""The pipeline's tasks: embed, capture, factor, propagate, assemble.

Each task is a plain function of a picklable :class:`Job` (so dask.distributed workers can
run it), re-derives what it needs from disk, writes its outputs atomically, and only then
records itself done. Re-running a task whose record is missing overwrites any torn attempt
and, every computation being deterministic, produces the same bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..stages.block_inputs import BlockInputs
from ..stages.build_block import ModelSkeleton, apply_factors, build_block, load_skeleton
from ..stages.capture import capture_block, forward_blocks, micro_batches
from ..stages.compress_block import compress_group
from ..stages.projections import module_path
from ..storage.activation_store import ActivationReader, write_activations
from ..storage.durable_dir import remove_tree
from ..storage.gram_store import read_grams, write_grams
from ..storage.shards import ShardReader
from .config import CompressConfig
from .manifest import WorkDir, is_done, mark_done

log = logging.getLogger("cospadi")


@dataclass(frozen=True)
class Job:
    """Everything a task needs, resolved once by the driver (picklable)."""

    config: CompressConfig
    model_dir: str
    work_root: str
    out: str
    num_layers: int
    groups: tuple[tuple[int, ...], ...]
    device: str
    dtype: str
    prune_source: str | None = None  # --prune-blocks: the original model (model_dir: pruned)
    source_layers: int = 0  # its depth
    prune_table: bool = False  # scans measure windows of every size 1..N (dry run), not 1, N

    @property
    def work(self) -> WorkDir:
        return WorkDir(Path(self.work_root))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def compressed(self) -> bool:
        return self.config.propagate == "compressed"

    def group_of(self, layer: int) -> int:
        return next(g for g, members in enumerate(self.groups) if layer in members)


# task names ------------------------------------------------------------------------------

def capture_name(layer: int) -> str:
    return f"capture-{layer:04d}"


def factor_name(group: int) -> str:
    return f"factor-{group:04d}"


def propagate_name(group: int) -> str:
    return f"propagate-{group:04d}"


EMBED, ASSEMBLE = "embed", "assemble"


# device exclusivity ----------------------------------------------------------------------

# Process-wide by nature: one GPU runs one task at a time, whatever thread asks for it.
_LOCAL_GATES: dict[str, threading.Lock] = {}
_GATES_GUARD = threading.Lock()


def device_gate(device: str):
    """Serialise device work per GPU: a distributed.Lock on a cluster, a thread lock here."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    try:
        from distributed import Lock, get_worker

        get_worker()
        return Lock(f"cospadi-device-{device}")
    except (ImportError, ValueError):
        with _GATES_GUARD:
            return _LOCAL_GATES.setdefault(device, threading.Lock())


@functools.cache
def _unfreeze_at_exit() -> None:
    """Registered once per process (gc.get_freeze_count walks every frozen object)."""
    atexit.register(gc.unfreeze)


def release_memory() -> None:
    """Return freed heap to the OS after a task, so RSS tracks live data, not history."""
    gc.collect()
    # What survives a task is long-lived (modules, caches): freezing it keeps the next
    # collect to the objects that task creates. Unfrozen, each collect walked every object
    # transformers and dask had made (~300k: 0.3 CPU-s per task, ~10 % of a prune-only run).
    # Unfrozen at exit, so that interpreter shutdown still collects them (nanobind, via
    # triton, otherwise reports them as leaked).
    _unfreeze_at_exit()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_growth() -> None:
    """Serve buffers >= 1 MiB by mmap so freeing them returns memory to the OS at once.

    glibc otherwise raises its mmap threshold after the first large free and then keeps
    later large tensors on the heap, where fragmentation makes RSS creep task by task.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def task(function: Callable[..., str] | None = None, *, heap_limit: bool = True):
    """A pipeline task: memory released after it. ``heap_limit=False`` for tasks that
    allocate the same shapes every time (the prune scans): glibc's own threshold then
    reuses their freed buffers, where the fixed 1 MiB one maps and faults in every
    intermediate of a block forward afresh (~20 % of a scan's CPU on SmolLM2)."""
    def wrap(function: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(function)
        def run(*args: object) -> str:
            if heap_limit:
                limit_heap_growth()  # per process: tasks may run in dask worker processes
            try:
                return function(*args)
            finally:
                release_memory()
        return run
    return wrap if function is None else wrap(function)


def _setup(job: Job) -> tuple[ModelSkeleton, ShardReader]:
    if job.config.torch_threads:
        torch.set_num_threads(job.config.torch_threads)
    skeleton = load_skeleton(job.model_dir, job.config.attn_implementation)
    return skeleton, ShardReader(job.model_dir)


def _writes_dense_output(job: Job, layer: int) -> bool:
    """Does capture(layer) also write the next block's inputs?"""
    if layer + 1 >= job.num_layers:
        return False
    if not job.compressed:
        return True
    return job.group_of(layer + 1) == job.group_of(layer)  # dense only inside a group


def has_propagate(job: Job, group: int) -> bool:
    """Compressed mode pushes every group but the last through its compressed blocks."""
    return job.compressed and group < len(job.groups) - 1


def _input_consumed_by_capture(job: Job, layer: int) -> bool:
    """May capture(layer) delete its input? (a group start's input may feed propagate)."""
    from .sensitivity_tasks import uses_sensitivity  # it imports this module

    if uses_sensitivity(job):
        return False  # the sensitivity task of this block reads it again, then removes it
    group = job.group_of(layer)
    return job.groups[group][0] != layer or not has_propagate(job, group)


def embed_calibration(job: Job, ids: torch.Tensor, skeleton: ModelSkeleton,
                      reader: ShardReader, store: Path) -> None:
    """The calibration windows ``ids`` (samples x seq_len, tokenised once by the driver)
    embedded by the model's own embedding into the activation store ``store``."""
    cfg = job.config
    with device_gate(job.device):
        inputs = BlockInputs(skeleton, reader, job.torch_dtype, torch.device(job.device))
        shape = (cfg.calib_samples, cfg.seq_len, skeleton.config.hidden_size)
        with write_activations(store, shape, job.torch_dtype, cfg.micro_batch) as sink:
            for lo, hi in micro_batches(cfg.calib_samples, cfg.micro_batch):
                sink.write(lo, inputs.embed(ids[lo:hi]))


# tasks -----------------------------------------------------------------------------------

@task
def run_embed(job: Job, ids: torch.Tensor, *_deps: object) -> str:
    if is_done(job.work, EMBED):
        return EMBED
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    embed_calibration(job, ids, skeleton, reader, job.work.activations(0))
    mark_done(job.work, EMBED, {"seconds": time.perf_counter() - start})
    log.info("embedded %d x %d calibration tokens", job.config.calib_samples,
             job.config.seq_len)
    return EMBED


@task
def run_capture(job: Job, layer: int, *_deps: object) -> str:
    name = capture_name(layer)
    if is_done(job.work, name):
        return name
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    cfg, work, device = job.config, job.work, torch.device(job.device)
    source = ActivationReader(work.activations(layer))
    with device_gate(job.device):
        block = build_block(skeleton, reader, layer, job.torch_dtype, device)
        inputs = BlockInputs(skeleton, None, job.torch_dtype, device)
        with contextlib.ExitStack() as stack:
            sink = None
            if _writes_dense_output(job, layer):
                sink = stack.enter_context(write_activations(
                    work.activations(layer + 1), source.shape, job.torch_dtype,
                    cfg.micro_batch))
            grams, tokens = capture_block(block, layer, inputs.layer_kwargs, source,
                                          cfg.micro_batch, job.torch_dtype, device, sink)
        write_grams(work.grams(layer), grams, tokens)
    del block, grams
    mark_done(work, name, {"seconds": time.perf_counter() - start, "tokens": tokens})
    if not cfg.keep_work and _input_consumed_by_capture(job, layer):
        remove_tree(work.activations(layer))
    log.info("block %d: captured %d tokens in %.1f s", layer, tokens,
             time.perf_counter() - start)
    return name


def _solver():
    # imported late: the solver stack is heavy and only factor tasks need it
    from ..stages.factorize import factorize_whitened

    return factorize_whitened


def _group_whitening():
    from ..stages.factorize import group_whitening

    return group_whitening


OMP_MEMORY_SHARE = 0.25  # of the device's free memory, when omp_memory is not set
OMP_MEMORY_FLOOR = 256 << 20


def free_device_memory(device: str) -> int:
    """Bytes free now on ``device`` (CUDA: the driver's count; CPU: available RAM)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def omp_memory_bytes(config: CompressConfig, device: str) -> int:
    """K-SVD's OMP working memory: as set, else a share of the device's free memory (a
    fixed 1 GiB made 70B shapes run thousands of skinny chunks)."""
    from ..storage.hf_checkpoint import parse_size

    if config.omp_memory is not None:
        return parse_size(config.omp_memory)
    return max(OMP_MEMORY_FLOOR, int(OMP_MEMORY_SHARE * free_device_memory(device)))


def solver_settings(job: Job):
    from ..stages.factorize import SolverSettings

    cfg = job.config
    memory = omp_memory_bytes(cfg, job.device) if cfg.solver == "ksvd" else OMP_MEMORY_FLOOR
    return SolverSettings(method=cfg.method, ratio=cfg.ratio, rho=cfg.rho, solver=cfg.solver,
                          iters=cfg.iters, refine_iters=cfg.refine_iters,
                          power_iters=cfg.power_iters, seed=cfg.seed, device=job.device,
                          atoms_per_step=cfg.omp_atoms_per_step, omp_memory_bytes=memory,
                          support=cfg.support)


def factor_metadata(job: Job, layer: int, group: tuple[int, ...]) -> dict:
    cfg = job.config
    return {"block": layer, "group": list(group), "method": cfg.method, "ratio": cfg.ratio,
            "rho": cfg.rho, "solver": cfg.solver, "iters": cfg.iters,
            "propagate": cfg.propagate}


@task
def run_factor(job: Job, group_index: int, *_deps: object) -> str:
    from ..storage.factor_files import write_block_factors

    name = factor_name(group_index)
    if is_done(job.work, name):
        return name
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    work, layers = job.work, job.groups[group_index]
    settings = solver_settings(job)
    held: dict[tuple[tuple[int, ...], str], object] = {}  # the input being solved only
    per_member = job.config.method == "masa"

    def weight(layer: int, projection: str) -> torch.Tensor:
        key = f"{module_path(skeleton.base_prefix, layer, projection)}.weight"
        return reader.load([key], dtype=torch.float32)[key].T

    def per_token_grams(members: tuple[int, ...], input_name: str):
        for layer in members:  # loaded one at a time: the mean holds at most two
            grams, tokens = read_grams(work.grams(layer), [input_name])
            yield grams.pop(input_name).div_(tokens)

    def whitening(members: tuple[int, ...], input_name: str):
        if (members, input_name) not in held:
            # drop the previous whitening before building the next; MASA whitens each
            # member by its own Gram and keeps a group's whitenings of one input together
            if not per_member or all(name != input_name for _, name in held):
                held.clear()
            held[(members, input_name)] = _group_whitening()(
                per_token_grams(members, input_name), settings, owned=True)
        return held[(members, input_name)]

    unit_solver, allocated = None, None
    if job.config.allocation != "uniform":
        from .allocation_tasks import allocated_solvers

        unit_solver, allocated = allocated_solvers(job)
    with device_gate(job.device):
        if job.config.method == "masa":  # per-member whitenings: held together per input
            from ..stages.masa import compress_group_masa

            result = compress_group_masa(layers, weight, whitening, job.config.ratio,
                                         job.config.masa_atoms,
                                         job.config.target_projections)
        else:
            result = compress_group(layers, weight, whitening, settings, _solver(),
                                    job.config.target_projections, unit_solver)
    for layer in layers:
        factors = {module_path(skeleton.base_prefix, layer, proj): f
                   for proj, f in result.factors[layer].items()}
        diagnostics = {module_path(skeleton.base_prefix, layer, proj): d
                       for proj, d in result.diagnostics[layer].items()}
        metadata = factor_metadata(job, layer, layers)
        if allocated is not None:
            from .allocation_tasks import layer_records

            metadata["allocation"] = layer_records(allocated, skeleton.base_prefix, layer)
        write_block_factors(work.factors(layer), factors, metadata, diagnostics=diagnostics)
    unusual = [s for s in result.solves if s["whitening"] != "cholesky"]
    for solve in unusual:
        log.warning("layers %s %s: Gram singular or indefinite, whitened by %s (shift %.3g)",
                    solve["layers"], solve["projection"], solve["whitening"], solve["shift"])
    mark_done(work, name, {"seconds": time.perf_counter() - start, "solves": result.solves})
    if not job.config.keep_work:
        for layer in layers:
            remove_tree(work.grams(layer))
    log.info("layers %s: factorised in %.1f s", list(layers), time.perf_counter() - start)
    return name


@task
def run_propagate(job: Job, group_index: int, *_deps: object) -> str:
    """Push the group's input through its compressed blocks: the next group's input."""
    from ..storage.factor_files import read_block_factors

    name = propagate_name(group_index)
    if is_done(job.work, name):
        return name
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    cfg, work, device = job.config, job.work, torch.device(job.device)
    layers = job.groups[group_index]
    source = ActivationReader(work.activations(layers[0]))
    with device_gate(job.device):
        blocks = []
        for layer in layers:
            block = build_block(skeleton, reader, layer, job.torch_dtype, device)
            stored = read_block_factors(work.factors(layer))
            prefix = skeleton.layer_path(layer) + "."
            local = {path.removeprefix(prefix): f for path, f in stored.items()}
            blocks.append((layer, apply_factors(block, local)))
        inputs = BlockInputs(skeleton, None, job.torch_dtype, device)
        with write_activations(work.activations(layers[-1] + 1), source.shape,
                               job.torch_dtype, cfg.micro_batch) as sink:
            forward_blocks(blocks, inputs.layer_kwargs, source, sink, cfg.micro_batch,
                           job.torch_dtype, device)
    mark_done(work, name, {"seconds": time.perf_counter() - start})
    if not cfg.keep_work:
        remove_tree(work.activations(layers[0]))
    log.info("layers %s: propagated compressed outputs in %.1f s", list(layers),
             time.perf_counter() - start)
    return name


@task
def run_assemble(job: Job, *_deps: object) -> str:
    from ..stages.assemble import assemble_model

    if is_done(job.work, ASSEMBLE):
        return ASSEMBLE
    start = time.perf_counter()
    factor_files = [job.work.factors(layer) for layer in range(job.num_layers)]
    # assemble_model stages the folder aside and renames it into place when complete;
    # the driver has already checked that an existing --out is ours to replace.
    assemble_model(job.model_dir, factor_files, job.out, overwrite=True,
                   max_shard_size=job.config.shard_size)
    mark_done(job.work, ASSEMBLE, {"seconds": time.perf_counter() - start})
    log.info("assembled %s in %.1f s", job.out, time.perf_counter() - start)
    return ASSEMBLE
