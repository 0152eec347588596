"""The ReplaceMe tasks of a run with ``--prune-blocks N`` (stages/replaceme.py has the math).

``prune-embed`` and one ``prune-scan-<block>`` per block stream the calibration tokens
through the original model: scan ``j`` writes ``h_{j+1}`` and the mean angular distance
of the windows of 1 and N blocks ending there (every size 1..N for the dry run's table),
kept in its done record. Only the hidden
states later scans or the best window so far still need stay on disk: ``h_{j-N}`` ..
``h_{j+1}``, plus ``h_{l-1}`` and ``h_{l+N}`` of the best window. ``prune-fit`` picks
the window, runs block ``l - 1`` again to get its MLP output, accumulates ``M^T M`` and
``M^T B`` in float64 (zarr), solves for ``T`` and folds it into that block's
``down_proj``. ``prune-write`` writes the pruned checkpoint: the output itself with
``--method none``, else the model the usual tasks then compress (``<work>/pruned``),
calibrated on the pruned model's own activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..stages.block_inputs import BlockInputs
from ..stages.build_block import build_block, load_skeleton
from ..stages.capture import micro_batches
from ..stages.projections import module_path
from ..stages.replaceme import (
    COSINE_EPOCHS,
    COSINE_LR,
    DOWN_PROJ,
    MLP,
    FitAccumulator,
    angular_distance_sum,
    choose_window,
    cosine_batches,
    fit_cosine,
    fold_down_proj,
    row_norms,
    solve_transform,
)
from ..storage.activation_store import ActivationReader, OverlappedWriter, write_activations
from ..storage.atomic import write_with
from ..storage.durable_dir import remove_tree
from ..storage.gram_store import write_grams
from ..storage.shards import ShardReader
from .manifest import WorkDir, is_done, mark_done
from .tasks import Job, device_gate, embed_calibration, task

log = logging.getLogger("cospadi")

PRUNE_EMBED, PRUNE_FIT, PRUNE_WRITE = "prune-embed", "prune-fit", "prune-write"
FITTED = ("lstsq", "cosine")  # prune-fit values that fold a map (drop folds none)


def scan_name(layer: int) -> str:
    return f"prune-scan-{layer:04d}"


# paths -------------------------------------------------------------------------------------

def scan_dir(work: WorkDir) -> Path:
    return work.root / "prune" / "scan"


def scan_store(work: WorkDir, index: int) -> Path:
    """Hidden states entering original block ``index`` (``index`` = depth: the last output)."""
    return scan_dir(work) / f"h_{index:04d}.zarr"


def fit_store(work: WorkDir) -> Path:
    return work.root / "prune" / "fit.zarr"


def transform_file(work: WorkDir) -> Path:
    return work.root / "prune" / "transform.safetensors"


def pruned_dir(work: WorkDir) -> Path:
    return work.root / "pruned"


def prune_dirs(job: Job) -> list[Path]:
    """Work folders a finished run removes (the transform file and records stay)."""
    if job.prune_source is None:
        return []
    return [scan_dir(job.work), fit_store(job.work), pruned_dir(job.work)]


def prune_output(job: Job) -> Path:
    return Path(job.out) if job.config.method == "none" else pruned_dir(job.work)


# graph pieces ------------------------------------------------------------------------------

def prune_order(job: Job) -> list[str]:
    return [PRUNE_EMBED] + [scan_name(i) for i in range(job.source_layers)] + \
        [PRUNE_FIT, PRUNE_WRITE]


def prune_inputs(job: Job, name: str) -> list[tuple[Path, str]]:
    """(store the prune task reads, task that writes it), for graph.reconcile."""
    work = job.work
    if name.startswith("prune-scan-"):
        layer = int(name.rpartition("-")[2])
        first = max(0, layer + 1 - job.config.prune_blocks)
        reads = range(first, layer + 1) if job.prune_table else sorted({first, layer})
        return [(scan_store(work, m), PRUNE_EMBED if m == 0 else scan_name(m - 1))
                for m in reads]
    if name == PRUNE_FIT:
        start = best_start(job, job.source_layers - 1)
        if start is None:  # scans not finished: they will provide the stores
            return []
        n = job.config.prune_blocks
        return [(scan_store(work, m), PRUNE_EMBED if m == 0 else scan_name(m - 1))
                for m in (start - 1, start + n)]
    if name == PRUNE_WRITE and job.config.prune_fit in FITTED:
        return [(transform_file(work), PRUNE_FIT)]
    return []


def add_prune_nodes(node, job: Job, ids: torch.Tensor) -> object:
    """Chain the prune tasks through ``node(name, function, *deps)``; returns the last.
    ``ids``: the calibration windows, tokenised once by the driver."""
    previous = node(PRUNE_EMBED, run_prune_embed, ids)
    for layer in range(job.source_layers):
        previous = node(scan_name(layer), run_prune_scan, layer, previous)
    previous = node(PRUNE_FIT, run_prune_fit, previous)
    return node(PRUNE_WRITE, run_prune_write, previous)


# distances ---------------------------------------------------------------------------------

def _record(work: WorkDir, name: str) -> dict:
    return json.loads(work.done_record(name).read_text())


def distance_table(job: Job, up_to: int | None = None) -> dict[int, dict[int, float]]:
    """``{size: {start: mean angular distance}}`` from the scans done so far (<= up_to)."""
    last = job.source_layers - 1 if up_to is None else up_to
    table: dict[int, dict[int, float]] = {}
    for layer in range(last + 1):
        if not is_done(job.work, scan_name(layer)):
            continue
        for window in _record(job.work, scan_name(layer))["windows"]:
            table.setdefault(window["size"], {})[window["start"]] = window["distance"]
    return table


def best_start(job: Job, up_to: int) -> int | None:
    candidates = distance_table(job, up_to).get(job.config.prune_blocks, {})
    return choose_window(candidates) if candidates else None


def _source_setup(job: Job):
    if job.config.torch_threads:
        torch.set_num_threads(job.config.torch_threads)
    return load_skeleton(job.prune_source, job.config.attn_implementation), \
        ShardReader(job.prune_source)


def _drop_unneeded_scans(job: Job, layer: int) -> None:
    """After scan ``layer``: keep what later scans and the best window so far read."""
    if job.config.keep_work:
        return
    n = job.config.prune_blocks
    keep = set(range(max(0, layer - n), layer + 2))
    start = best_start(job, layer)
    if start is not None:
        keep |= {start - 1, start + n}
    for path in sorted(scan_dir(job.work).glob("h_*.zarr")):
        if int(path.stem[2:]) not in keep:
            remove_tree(path)


# tasks -------------------------------------------------------------------------------------

@task(heap_limit=False)
def run_prune_embed(job: Job, ids: torch.Tensor) -> str:
    if is_done(job.work, PRUNE_EMBED):
        return PRUNE_EMBED
    start, cpu = time.perf_counter(), time.process_time()
    skeleton, reader = _source_setup(job)
    embed_calibration(job, ids, skeleton, reader, scan_store(job.work, 0))
    mark_done(job.work, PRUNE_EMBED, {"seconds": time.perf_counter() - start,
                                      "cpu_seconds": time.process_time() - cpu})
    return PRUNE_EMBED


# Hidden states handed from scan to scan in memory (the stores are still written: resume,
# the fit and the dry run's table read them) up to this many bytes in all: a scan's input
# and the N - 1 states before it that the windows ending after the next scans compare
# with. What does not fit (the oldest first), resumed runs and runs on a dask cluster read
# the stores instead.
HANDOVER_BYTES = 1 << 30


@dataclasses.dataclass
class Handover:
    """``h_i`` in memory by index ``i``, from scan ``layer - 1`` to scan ``layer``; taken
    once, so dask (which keeps every target's result to the end) does not keep them."""

    layer: int
    states: dict[int, torch.Tensor]

    def take(self, layer: int) -> dict[int, torch.Tensor]:
        if self.layer != layer:
            return {}
        states, self.states = self.states, {}
        return states


def _kept_output(job: Job, layer: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A host tensor for scan ``layer``'s output, or None when it is not handed over."""
    if layer + 1 >= job.source_layers or job.config.local_scheduler() is None:
        return None
    if math.prod(shape) * job.torch_dtype.itemsize > HANDOVER_BYTES:
        return None
    return torch.empty(shape, dtype=job.torch_dtype)


def _handed_on(held: dict[int, torch.Tensor], output: torch.Tensor, layer: int,
               n: int) -> dict[int, torch.Tensor]:
    """What scan ``layer + 1`` gets: its input and the states of index >= layer + 2 - n
    (those later scans compare with), newest first while within HANDOVER_BYTES."""
    states, total = {layer + 1: output}, output.nbytes
    for index in sorted((i for i in held if i >= layer + 2 - n), reverse=True):
        total += held[index].nbytes
        if total > HANDOVER_BYTES:
            break
        states[index] = held[index]
    return states


@task(heap_limit=False)
def run_prune_scan(job: Job, layer: int, previous: object = None) -> str | Handover:
    """Block ``layer`` over its inputs (handed over in memory by the previous scan, else
    read from the store); writes ``h_{layer+1}`` and the distances of the windows ending
    after it."""
    name = scan_name(layer)
    if is_done(job.work, name):
        return name
    start, cpu = time.perf_counter(), time.process_time()
    skeleton, reader = _source_setup(job)
    cfg, work, device = job.config, job.work, torch.device(job.device)
    held = previous.take(layer) if isinstance(previous, Handover) else {}

    def source(index: int) -> torch.Tensor | ActivationReader:
        return held[index] if index in held else ActivationReader(scan_store(work, index))

    given = source(layer)
    shape = tuple(given.shape)
    # the run needs size N only (1 is free: its input is in memory); each other size is one
    # more distance per scan (and a store read when not held), so only the dry run's table
    # measures them all
    wanted = range(1, cfg.prune_blocks + 1) if job.prune_table else {1, cfg.prune_blocks}
    sizes = sorted(n for n in wanted if layer + 1 - n >= 1)
    earlier = {n: source(layer + 1 - n) for n in sizes if n > 1}
    sums = dict.fromkeys(sizes, 0.0)
    tokens = 0
    samples, seq_len, _ = shape
    kept = _kept_output(job, layer, shape)
    with device_gate(job.device):
        block = build_block(skeleton, reader, layer, job.torch_dtype, device)
        inputs = BlockInputs(skeleton, None, job.torch_dtype, device)
        with write_activations(scan_store(work, layer + 1), shape, job.torch_dtype,
                               cfg.micro_batch) as store, OverlappedWriter(store) as sink, \
                torch.no_grad():
            for lo, hi in micro_batches(samples, cfg.micro_batch):
                hidden = _rows(given, lo, hi).to(device=device, dtype=job.torch_dtype)
                out = block(hidden, **inputs.layer_kwargs(layer, hi - lo, seq_len))
                sink.write(lo, out)  # in the background, while the distances run
                if kept is not None:
                    kept[lo:hi] = out
                out_norms = row_norms(out)  # once for the N windows ending here
                for n in sizes:
                    before = hidden if n == 1 else _rows(earlier[n], lo, hi).to(device)
                    sums[n] += angular_distance_sum(before, out, out_norms)[0]
                tokens += (hi - lo) * seq_len
    windows = [{"start": layer + 1 - n, "size": n, "distance": sums[n] / tokens}
               for n in sizes]
    mark_done(work, name, {"seconds": time.perf_counter() - start,
                           "cpu_seconds": time.process_time() - cpu, "tokens": tokens,
                           "windows": windows})
    _drop_unneeded_scans(job, layer)
    log.info("block %d: scanned in %.1f s", layer, time.perf_counter() - start)
    if kept is None:
        return name
    return Handover(layer + 1, _handed_on(held, kept, layer, cfg.prune_blocks))


def _rows(states: torch.Tensor | ActivationReader, lo: int, hi: int) -> torch.Tensor:
    return states[lo:hi] if isinstance(states, torch.Tensor) else states.read(lo, hi)


def _down_proj_names(job: Job, block_index: int) -> tuple[str, str]:
    skeleton = load_skeleton(job.prune_source, job.config.attn_implementation)
    path = module_path(skeleton.base_prefix, block_index, DOWN_PROJ)
    return f"{path}.weight", f"{path}.bias"


def fit_stores(work: WorkDir) -> tuple[Path, Path]:
    """The cosine fit's rows: M (block ``l - 1``'s MLP output) and ``h_l - M``."""
    return work.root / "prune" / "fit_m.zarr", work.root / "prune" / "fit_rest.zarr"


def _block_pass(job: Job, start: int, reader, skeleton, fits: FitAccumulator | None) -> None:
    """Block ``start - 1`` over ``h_{start-1}``: least-squares sums into ``fits`` or, for
    the cosine fit (``fits`` None), M and ``h_l - M`` to disk (the Adam epochs read them
    back)."""
    cfg, work, device = job.config, job.work, torch.device(job.device)
    before = ActivationReader(scan_store(work, start - 1))
    after = ActivationReader(scan_store(work, start + cfg.prune_blocks))
    samples, seq_len, _ = before.shape
    sinks = contextlib.ExitStack()
    with device_gate(job.device), torch.no_grad(), sinks:
        block = build_block(skeleton, reader, start - 1, job.torch_dtype, device)
        inputs = BlockInputs(skeleton, None, job.torch_dtype, device)
        stores = [] if fits is not None else [
            sinks.enter_context(write_activations(path, before.shape, job.torch_dtype,
                                                  cfg.micro_batch))
            for path in fit_stores(work)]
        seen: list[torch.Tensor] = []
        handle = block.get_submodule(MLP).register_forward_hook(
            lambda _m, _a, output: seen.append(output))
        try:
            for lo, hi in micro_batches(samples, cfg.micro_batch):
                hidden = before.read(lo, hi).to(device=device, dtype=job.torch_dtype)
                seen.clear()
                out = block(hidden, **inputs.layer_kwargs(start - 1, hi - lo, seq_len))
                if fits is not None:
                    fits.add(seen[0], out, after.read(lo, hi).to(device))
                else:
                    stores[0].write(lo, seen[0])
                    stores[1].write(lo, out - seen[0])
        finally:
            handle.remove()


def _cosine_rows(job: Job, start: int):
    """``read(lo, hi)`` of the cosine fit: M, ``h_l - M`` and ``h_{l+N}`` token rows."""
    stores = [ActivationReader(p) for p in fit_stores(job.work)] + \
        [ActivationReader(scan_store(job.work, start + job.config.prune_blocks))]
    device = torch.device(job.device)

    def read(lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        return tuple(store.read(lo, hi).reshape(-1, store.shape[2]).to(
            device=device, dtype=torch.float32) for store in stores)
    return read, stores[0].shape[0]


@task(heap_limit=False)
def run_prune_fit(job: Job, *_deps: object) -> str:
    """Choose the window; with ``lstsq`` or ``cosine``, fit T and fold it into block l - 1."""
    if is_done(job.work, PRUNE_FIT):
        return PRUNE_FIT
    begin, cpu = time.perf_counter(), time.process_time()
    cfg, work = job.config, job.work
    n = cfg.prune_blocks
    distances = distance_table(job)[n]
    start = choose_window(distances)
    info: dict = {"start": start, "size": n, "distance": distances[start],
                  "fit": cfg.prune_fit}
    if cfg.prune_fit in FITTED:
        skeleton, reader = _source_setup(job)
        if cfg.prune_fit == "lstsq":
            accumulator = FitAccumulator()
            _block_pass(job, start, reader, skeleton, accumulator)
            write_grams(fit_store(work), {"mtm": accumulator.mtm, "mtb": accumulator.mtb},
                        accumulator.tokens)
            solved = solve_transform(accumulator.mtm, accumulator.mtb)
            matrix = solved.matrix
            info.update(solve=solved.path, ridge=solved.ridge, tokens=accumulator.tokens)
        else:  # cosine: needs the rows, not the least-squares sums
            _block_pass(job, start, reader, skeleton, None)
            read, samples = _cosine_rows(job, start)
            matrix, losses = fit_cosine(
                skeleton.config.hidden_size,
                lambda epoch: cosine_batches(read, samples, cfg.micro_batch, cfg.seed, epoch),
                torch.device(job.device))
            info.update(cosine_loss=losses, epochs=COSINE_EPOCHS, lr=COSINE_LR,
                        tokens=samples * cfg.seq_len)
        weight_name, bias_name = _down_proj_names(job, start - 1)
        weight = reader.load([weight_name], dtype=torch.float64)[weight_name]
        bias = reader.load([bias_name], dtype=torch.float64)[bias_name] \
            if bias_name in reader else None
        folded, folded_bias = fold_down_proj(weight, bias, matrix)
        tensors = {"transform": matrix.cpu().contiguous(),
                   weight_name: folded.cpu().contiguous()}
        if folded_bias is not None:
            tensors[bias_name] = folded_bias.cpu().contiguous()
        write_with(transform_file(work),
                   lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    mark_done(work, PRUNE_FIT, dict(info, seconds=time.perf_counter() - begin,
                                    cpu_seconds=time.process_time() - cpu))
    if not cfg.keep_work:
        for path in (scan_dir(work), fit_store(work), *fit_stores(work)):
            remove_tree(path)
    log.info("pruning blocks %d..%d (mean angular distance %.4f), fit %s in %.1f s", start,
             start + n - 1, distances[start], cfg.prune_fit, time.perf_counter() - begin)
    return PRUNE_FIT


def read_transform(work: WorkDir) -> dict[str, torch.Tensor]:
    with safe_open(str(transform_file(work)), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def prune_section(job: Job) -> dict:
    fit = _record(job.work, PRUNE_FIT)
    table = distance_table(job)
    section = {"method": "replaceme", "fit": fit["fit"], "original_layers": job.source_layers,
               "removed": [fit["start"], fit["start"] + fit["size"]],
               "distance": fit["distance"],
               "distances": {str(size): {str(s): d for s, d in sorted(row.items())}
                             for size, row in sorted(table.items())}}
    for key in ("solve", "ridge", "tokens", "cosine_loss", "epochs", "lr"):
        if key in fit:
            section[key] = fit[key]
    return section


@task
def run_prune_write(job: Job, *_deps: object) -> str:
    from ..stages.prune_checkpoint import write_pruned  # late: it imports the assembler

    if is_done(job.work, PRUNE_WRITE):
        return PRUNE_WRITE
    begin, cpu = time.perf_counter(), time.process_time()
    fit = _record(job.work, PRUNE_FIT)
    replaced = {}
    if fit["fit"] in FITTED:
        replaced = {k: v for k, v in read_transform(job.work).items() if k != "transform"}
    skeleton = load_skeleton(job.prune_source, job.config.attn_implementation)
    write_pruned(job.prune_source, prune_output(job), base_prefix=skeleton.base_prefix,
                 start=fit["start"], size=fit["size"], replaced=replaced,
                 section=prune_section(job), max_shard_size=job.config.shard_size)
    mark_done(job.work, PRUNE_WRITE, {"seconds": time.perf_counter() - begin,
                                      "cpu_seconds": time.process_time() - cpu})
    log.info("pruned checkpoint written to %s in %.1f s", prune_output(job),
             time.perf_counter() - begin)
    return PRUNE_WRITE


# dry run -------------------------------------------------------------------------------------

def scan_distances(job: Job, ids: torch.Tensor) -> dict[int, dict[int, float]]:
    """The distance table alone: the scan tasks run in a throwaway work directory."""
    parent = Path(job.work_root).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cospadi-scan-", dir=parent) as tmp:
        scratch = dataclasses.replace(job, work_root=tmp, prune_table=True)
        run_prune_embed(scratch, ids)
        previous = None
        for layer in range(job.source_layers):
            previous = run_prune_scan(scratch, layer, previous)
        return distance_table(scratch)


def format_table(table: dict[int, dict[int, float]], size: int) -> str:
    """Rows: window start; columns: window size; ``*`` marks the window pruned at ``size``."""
    sizes = sorted(table)
    starts = sorted({s for row in table.values() for s in row})
    chosen = choose_window(table[size]) if table.get(size) else None
    lines = ["mean angular distance arccos(cos(h_l, h_{l+n})) / pi over calibration tokens "
             "(window [l, l+n); * = removed)",
             f"{'l':>4}" + "".join(f"{f'n={n}':>10}" for n in sizes)]
    for s in starts:
        cells = []
        for n in sizes:
            value = table[n].get(s)
            mark = "*" if (n == size and s == chosen) else " "
            cells.append(f"{value:>9.4f}{mark}" if value is not None else f"{'':>10}")
        lines.append(f"{s:>4}" + "".join(cells))
    return "\n".join(lines)

