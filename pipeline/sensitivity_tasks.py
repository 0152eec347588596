"""The streamed sensitivity pass of ``--allocation-weight loss``: one task per block.

``sensitivity-L`` runs after the capture of block L (whose input activations the capture
keeps for it) and after ``sensitivity-(L+1)``, from the last block down. It recomputes
block L from its stored input with gradients, takes ``dL/dh`` of its output from the task
above (the top block: from the final norm, the LM head and the calibration windows' next
tokens), writes ``dL/dh`` of its input (``<work>/sensitivity/grad_L.zarr``, atomically;
none for block 0)
and the block's seven ``a_j`` (``<work>/sensitivity/block_L.json``), then records itself
done; it resumes like the capture. Once done, block L's input activations and the
gradient file above are no longer needed and go (unless ``--keep-work``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

import torch

from ..stages.block_inputs import BlockInputs
from ..stages.build_block import (
    ArchitectureError,
    ModelSkeleton,
    build_block,
    build_final_norm,
    build_module,
)
from ..stages.sensitivity import Head, block_backward, head_gradient, sensitivities
from ..storage.activation_store import ActivationReader, write_activations
from ..storage.atomic import write_json
from ..storage.durable_dir import remove_tree
from ..storage.shards import ShardReader
from .manifest import is_done, mark_done
from .tasks import Job, _setup, device_gate, task

log = logging.getLogger("cospadi")


def sensitivity_name(layer: int) -> str:
    return f"sensitivity-{layer:04d}"


def uses_sensitivity(job: Job) -> bool:
    return job.config.allocation != "uniform" and job.config.allocation_weight == "loss"


def sensitivity_samples(job: Job) -> int:
    """Windows the pass backpropagates (the first N of the calibration set)."""
    return job.config.sensitivity_samples or job.config.calib_samples


def grad_path(job: Job, layer: int) -> Path:
    """``dL/dh`` of the input of ``layer``."""
    return job.work.root / "sensitivity" / f"grad_{layer:04d}.zarr"


def block_path(job: Job, layer: int) -> Path:
    return job.work.root / "sensitivity" / f"block_{layer:04d}.json"


def build_head(skeleton: ModelSkeleton, reader: ShardReader, dtype: torch.dtype,
               device: torch.device) -> Head:
    """Final norm and LM head from the checkpoint (a tied head: the embedding's weight)."""
    meta = skeleton.meta_model.get_output_embeddings()
    if meta is None:
        raise ArchitectureError(f"{type(skeleton.meta_model).__name__} has no LM head")
    path = skeleton.path_of(meta)
    if f"{path}.weight" in reader:
        lm_head = build_module(skeleton, reader, path, dtype, device)
    else:
        if not getattr(skeleton.config, "tie_word_embeddings", False):
            raise ArchitectureError(f"checkpoint in {reader.model_dir} lacks {path}.weight "
                                    "and the model does not tie it to the embedding")
        key = f"{skeleton.path_of(skeleton.base.get_input_embeddings())}.weight"
        lm_head = copy.deepcopy(meta)
        lm_head.load_state_dict({"weight": reader.load([key], dtype=dtype)[key].to(device)},
                                strict=False, assign=True)
        lm_head.requires_grad_(False)
    norm = build_final_norm(skeleton, reader, dtype, device)
    return Head(norm, lm_head, getattr(skeleton.config, "final_logit_softcapping", None))


def _discard(_start: int, _grad: torch.Tensor) -> None:
    pass


@task
def run_sensitivity(job: Job, layer: int, ids: torch.Tensor | None, *_deps: object) -> str:
    """``ids``: the calibration windows' token ids, needed by the top block only (its
    ``dL/dh`` comes from the LM head and the next-token labels)."""
    name = sensitivity_name(layer)
    if is_done(job.work, name):
        return name
    start = time.perf_counter()
    skeleton, reader = _setup(job)
    cfg, work, device, dtype = job.config, job.work, torch.device(job.device), job.torch_dtype
    samples = sensitivity_samples(job)
    source = ActivationReader(work.activations(layer))
    top = layer == job.num_layers - 1
    with device_gate(job.device):
        block = build_block(skeleton, reader, layer, dtype, device)
        inputs = BlockInputs(skeleton, None, dtype, device)
        if top:
            if ids is None:
                raise ValueError(f"{name}: the top block needs the calibration ids")
            output_grad = head_gradient(build_head(skeleton, reader, dtype, device),
                                        ids[:samples])
        else:
            above = ActivationReader(grad_path(job, layer + 1))

            def output_grad(lo: int, hi: int, _out: torch.Tensor):
                return above.read(lo, hi).to(device=device, dtype=dtype), 0.0
        shape = (samples, *source.shape[1:])
        with contextlib.ExitStack() as stack:
            write_grad = _discard  # the gradient entering block 0 has no reader
            if layer > 0:
                write_grad = stack.enter_context(write_activations(
                    grad_path(job, layer), shape, dtype, cfg.micro_batch)).write
            sums, loss = block_backward(block, layer, inputs.layer_kwargs, source.read,
                                        output_grad, write_grad, samples, cfg.micro_batch,
                                        dtype, device)
    out_features = {p: block.get_submodule(p).out_features for p in sums}
    values = sensitivities(sums, samples * source.shape[1], out_features)
    write_json(block_path(job, layer), {"layer": layer, "sensitivity": values,
                                        "samples": samples, "loss": loss})
    del block
    mark_done(work, name, {"seconds": time.perf_counter() - start, "samples": samples})
    if not cfg.keep_work:
        remove_tree(work.activations(layer))
        if not top:
            remove_tree(grad_path(job, layer + 1))
    log.info("block %d: loss sensitivities of %d windows in %.1f s", layer, samples,
             time.perf_counter() - start)
    return name


def read_block_sensitivities(job: Job) -> dict[str, float]:
    """Every block's ``a_j``, keyed ``<projection>@<layer>`` as the allocation reads them."""
    from ..stages.allocation import AllocationError

    out: dict[str, float] = {}
    for layer in range(job.num_layers):
        path = block_path(job, layer)
        try:
            values = json.loads(path.read_text())["sensitivity"]
        except (OSError, ValueError, KeyError) as err:
            raise AllocationError(f"allocation-weight loss: the sensitivity file {path} is "
                                  f"unreadable: {err}") from err
        out.update({f"{p}@{layer}": float(v) for p, v in values.items()})
    return out

