"""Write a depth-pruned checkpoint of the original architecture (plain transformers loads it).

Blocks ``[start, start + size)`` are left out and later blocks renumbered; replaced tensors
(the folded ``down_proj`` of the block before the window) come from the caller. The config
gets ``num_hidden_layers`` reduced and every per-layer list cut the same way: the resolved
``layer_types`` is written out explicitly (so a pattern such as Gemma's
``sliding_window_pattern`` or Qwen2's ``max_window_layers`` no longer decides it), and
other top-level lists with one entry per layer (``no_rope_layers``, ...) are cut too.
A ``cospadi_prune`` section records what was removed; transformers ignores it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..storage.atomic import write_json
from ..storage.hf_checkpoint import (
    OutTensor,
    TensorSource,
    checkpoint_tensors,
    copy_side_files,
    parse_size,
    write_shards,
)
from .assemble import MODELING_FILE, staged_dir
from .build_block import load_config
from .replaceme import PRUNE_SECTION, kept_layers


def pruned_config(model_dir: Path, start: int, size: int, section: dict) -> dict:
    """config.json of the pruned model (a dict ready to write)."""
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    depth = raw.get("num_hidden_layers")
    if not isinstance(depth, int):
        raise ValueError(f"{model_dir / 'config.json'} has no integer num_hidden_layers")
    keep = kept_layers(depth, start, size)
    resolved = getattr(load_config(model_dir), "layer_types", None)
    config = dict(raw, num_hidden_layers=len(keep))
    if isinstance(resolved, list) and len(resolved) == depth:
        config["layer_types"] = list(resolved)
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == depth and "layer" in key:
            config[key] = [value[i] for i in keep]
    if isinstance(config.get("max_window_layers"), int):  # Qwen2: layers below use full attn
        config["max_window_layers"] = sum(1 for i in keep if i < raw["max_window_layers"])
    config[PRUNE_SECTION] = section
    return config


def renamed(name: str, layers_prefix: str, new_index: dict[int, int]) -> str | None:
    """The tensor's name in the pruned model, None when its block is removed."""
    if not name.startswith(layers_prefix):
        return name
    match = re.match(r"(\d+)(\..*)", name[len(layers_prefix):])
    if match is None:
        return name
    index = int(match.group(1))
    if index not in new_index:
        return None
    return f"{layers_prefix}{new_index[index]}{match.group(2)}"


def write_pruned(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_prefix: str,
                 start: int, size: int, replaced: dict[str, torch.Tensor], section: dict,
                 max_shard_size: int | str = "2GB") -> Path:
    """The pruned checkpoint at ``out_dir`` (staged aside, renamed into place when whole).

    ``replaced``: tensors by their *original* names (e.g. the folded down_proj), stored in
    the dtype of the tensor they replace.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    original = checkpoint_tensors(model_dir)
    depth = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))[
        "num_hidden_layers"]
    new_index = {old: new for new, old in enumerate(kept_layers(depth, start, size))}
    prefix = f"{base_prefix}.layers."
    kept = sum(info.numel for name, info in original.items()
               if renamed(name, prefix, new_index) is not None)
    section = dict(section, params={"original": sum(i.numel for i in original.values()),
                                    "kept": kept})
    config = pruned_config(model_dir, start, size, section)
    unknown = sorted(set(replaced) - set(original))
    if unknown:
        raise ValueError(f"replaced tensors not in {model_dir}: {unknown}")
    reader = TensorSource()
    try:
        out = []
        for name, info in original.items():
            target = renamed(name, prefix, new_index)
            if target is None:
                continue
            if name in replaced:
                value = replaced[name].to(info.dtype)
                if tuple(value.shape) != info.shape:
                    raise ValueError(f"{name}: replacement has shape {tuple(value.shape)}, "
                                     f"the original {info.shape}")
                out.append(OutTensor(target, info.nbytes, lambda v=value: v))
            else:
                out.append(OutTensor(target, info.nbytes,
                                     lambda i=info, n=name: reader.get(i, n)))
        with staged_dir(out_dir, overwrite=True) as tmp:
            write_shards(tmp, out, parse_size(max_shard_size))
            write_json(tmp / "config.json", config)
            copy_side_files(model_dir, tmp, skip=(MODELING_FILE,))
    finally:
        reader.close()
    return out_dir
