"""The dask task graph of a run and its execution, locally or on a dask.distributed cluster.

Per block: capture (inputs -> Grams and next inputs); per group: factor (Grams -> factor
files) and, with ``--propagate compressed``, propagate (compressed outputs -> next group's
inputs); finally assemble. Tasks already recorded done are left out and their names stand
in as plain values. Capturing group g also waits for the factorisation of group
g - max_inflight, which bounds the Grams and activations alive at once however deep the
model is.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import dask
import torch
from dask.callbacks import Callback
from dask.delayed import Delayed

from .prune_tasks import PRUNE_WRITE, add_prune_nodes, prune_inputs, prune_order, pruned_dir
from .tasks import (
    ASSEMBLE,
    EMBED,
    Job,
    capture_name,
    factor_name,
    has_propagate,
    propagate_name,
    run_assemble,
    run_capture,
    run_embed,
    run_factor,
    run_propagate,
)

log = logging.getLogger("cospadi")


def _global(job: Job) -> bool:
    return job.config.allocation != "uniform"


def task_order(job: Job) -> list[str]:
    """Every task of the run in a valid execution order."""
    if _global(job):
        from .allocation_tasks import ALLOCATE, curves_name
        from .sensitivity_tasks import sensitivity_name, uses_sensitivity

        names = [EMBED]
        for group, layers in enumerate(job.groups):
            names += [capture_name(layer) for layer in layers] + [curves_name(group)]
        if uses_sensitivity(job):
            names += [sensitivity_name(layer) for layer in reversed(range(job.num_layers))]
        return names + [ALLOCATE] + [factor_name(g) for g in range(len(job.groups))] + \
            [ASSEMBLE]
    if job.prune_source is not None:
        if job.config.method == "none":
            return prune_order(job)
        names = prune_order(job) + [EMBED]
    else:
        names = [EMBED]
    for group, layers in enumerate(job.groups):
        names += [capture_name(layer) for layer in layers]
        names.append(factor_name(group))
        if has_propagate(job, group):
            names.append(propagate_name(group))
    return names + [ASSEMBLE]


def producer_of_input(job: Job, layer: int) -> str:
    """The task that writes the activations entering ``layer``."""
    if layer == 0:
        return EMBED
    group = job.group_of(layer)
    if job.compressed and job.groups[group][0] == layer:
        return propagate_name(group - 1)
    return capture_name(layer - 1)


def task_inputs(job: Job, name: str) -> list[tuple[Path, str]]:
    """(file or store the task reads, task that writes it)."""
    work = job.work
    kind, _, number = name.partition("-")
    if kind == "prune":
        return prune_inputs(job, name)
    if job.prune_source is not None and name in (EMBED, ASSEMBLE):  # they read the pruned model
        extra = [(pruned_dir(work), PRUNE_WRITE)]
        if name == EMBED:
            return extra
    else:
        extra = []
    if kind == "capture":
        layer = int(number)
        return [(work.activations(layer), producer_of_input(job, layer))]
    if kind in ("factor", "curves"):
        grams = [(work.grams(layer), capture_name(layer)) for layer in job.groups[int(number)]]
        if kind == "factor" and _global(job):
            from .allocation_tasks import ALLOCATE, allocation_path

            grams.append((allocation_path(job), ALLOCATE))
        return grams
    if kind == "sensitivity":
        from .sensitivity_tasks import grad_path, sensitivity_name

        layer = int(number)
        above = [(grad_path(job, layer + 1), sensitivity_name(layer + 1))] \
            if layer + 1 < job.num_layers else []
        return [(work.activations(layer), producer_of_input(job, layer))] + above
    if kind == "allocate":
        from .allocation_tasks import curves_name, curves_path
        from .sensitivity_tasks import block_path, sensitivity_name, uses_sensitivity

        sensitivity = [(block_path(job, layer), sensitivity_name(layer))
                       for layer in range(job.num_layers)] if uses_sensitivity(job) else []
        return [(curves_path(job, g), curves_name(g)) for g in range(len(job.groups))] + \
            sensitivity
    if kind == "propagate":
        layers = job.groups[int(number)]
        return [(work.activations(layers[0]), producer_of_input(job, layers[0]))] + \
            [(work.factors(layer), factor_name(int(number))) for layer in layers]
    if name == ASSEMBLE:
        return extra + [(work.factors(layer), factor_name(job.group_of(layer)))
                        for layer in range(job.num_layers)]
    return []


def reconcile(job: Job, done: set[str]) -> set[str]:
    """Mark undone any finished task whose output a pending task needs but cannot find.

    Normally a no-op: outputs are deleted only once no pending task needs them. It makes
    resume robust to files removed by hand (the producer simply runs again).
    """
    done = set(done)
    changed = True
    while changed:
        changed = False
        for name in task_order(job):
            if name in done:
                continue
            for path, producer in task_inputs(job, name):
                if producer in done and not path.exists():
                    log.warning("%s needs %s, which is missing: running %s again", name,
                                path, producer)
                    done.discard(producer)
                    job.work.done_record(producer).unlink(missing_ok=True)
                    changed = True
    return done


def build_graph(job: Job, done: set[str], ids: torch.Tensor) -> dict[str, Delayed]:
    """Delayed objects of the tasks not yet done, keyed (and dask-keyed) by task name.
    ``ids``: the calibration windows, tokenised once by the driver, for the embed tasks."""
    nodes: dict[str, Delayed] = {}

    def node(name: str, function: Callable, *args: object) -> object:
        if name in done:
            return name
        bound = functools.partial(function, job)  # job as a constant, not a dask collection
        nodes[name] = dask.delayed(bound, pure=False)(*args, dask_key_name=name)
        return nodes[name]

    if _global(job):
        _add_global_graph(job, node, ids)
        return nodes
    pruned = []
    if job.prune_source is not None:
        pruned = [add_prune_nodes(node, job, ids)]
        if job.config.method == "none":
            return nodes
    previous = node(EMBED, run_embed, ids, *pruned)  # the task producing the next block's inputs
    factors: list[object] = []
    for group, layers in enumerate(job.groups):
        backpressure = [factors[group - job.config.max_inflight]] \
            if group >= job.config.max_inflight else []
        captures = []
        for layer in layers:
            previous = node(capture_name(layer), run_capture, layer, previous, *backpressure)
            captures.append(previous)
        factors.append(node(factor_name(group), run_factor, group, *captures))
        if has_propagate(job, group):
            previous = node(propagate_name(group), run_propagate, group, factors[-1],
                            *captures)
    node(ASSEMBLE, run_assemble, *factors)
    return nodes


def _add_global_graph(job: Job, node: Callable[..., object], ids: torch.Tensor) -> None:
    """``--allocation global``: every group's curves (and with the loss weight, the
    sensitivity tasks from the last block down), one allocation, then the factor tasks.
    Capturing group g waits for the curves of group g - max_inflight (Grams are kept until
    their factor task; with the loss weight every block's input until its sensitivity
    task)."""
    from .allocation_tasks import ALLOCATE, curves_name, run_allocate, run_curves
    from .sensitivity_tasks import run_sensitivity, sensitivity_name, uses_sensitivity

    previous = node(EMBED, run_embed, ids)
    curves: list[object] = []
    captures: list[object] = []  # per layer
    for group, layers in enumerate(job.groups):
        backpressure = [curves[group - job.config.max_inflight]] \
            if group >= job.config.max_inflight else []
        for layer in layers:
            previous = node(capture_name(layer), run_capture, layer, previous, *backpressure)
            captures.append(previous)
        curves.append(node(curves_name(group), run_curves, group,
                           *captures[layers[0]:layers[-1] + 1]))
    if uses_sensitivity(job):
        # sensitivity-L reads block L's input (written by capture L-1) once capture L has
        # read it too, and dL/dh from sensitivity-(L+1)
        above: list[object] = []
        for layer in reversed(range(job.num_layers)):
            top_ids = ids if layer == job.num_layers - 1 else None
            above = [node(sensitivity_name(layer), run_sensitivity, layer, top_ids,
                          captures[layer], *above)]
        curves += above
    allocation = node(ALLOCATE, run_allocate, *curves)
    factors = [node(factor_name(group), run_factor, group, allocation)
               for group in range(len(job.groups))]
    node(ASSEMBLE, run_assemble, *factors)


class _Progress(Callback):
    def __init__(self, on_done: Callable[[str], None], names: set[str]):
        super().__init__()
        self.on_done, self.names = on_done, names

    def _posttask(self, key, result, dsk, state, worker_id) -> None:  # noqa: ANN001
        if key in self.names:
            self.on_done(key)


def execute(job: Job, nodes: dict[str, Delayed], on_done: Callable[[str], None]) -> None:
    """Run the graph; ``on_done(task)`` is called as each task completes."""
    if not nodes:
        return
    targets = list(nodes.values())
    scheduler = job.config.local_scheduler()
    if scheduler is not None:
        with _Progress(on_done, set(nodes)):
            dask.compute(*targets, scheduler=scheduler, num_workers=job.config.workers)
        return
    _execute_distributed(job, targets, on_done)


def probe_scheduler(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a closed port (the dask client itself retries for its whole timeout)."""
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://"):].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"cannot reach dask scheduler {address}: {err}") from err


def _execute_distributed(job: Job, targets: list[Delayed],
                         on_done: Callable[[str], None]) -> None:
    from distributed import Client, as_completed

    log.info("submitting %d tasks to dask scheduler %s", len(targets), job.config.scheduler)
    probe_scheduler(job.config.scheduler)
    try:
        client = Client(job.config.scheduler, set_as_default=False, timeout="30s")
    except OSError as err:
        raise ConnectionError(f"cannot reach dask scheduler {job.config.scheduler}: "
                              f"{err}") from err
    with client:
        futures = client.compute(targets)
        try:
            for future in as_completed(futures, loop=client.loop):
                on_done(future.result())
        except BaseException:
            client.cancel(futures)
            raise
