"""Build the architecture's own modules (decoder layers, embedding, norm) one at a time.

The ForCausalLM class is instantiated on the meta device (no storage at all) to learn the
module tree; single submodules are then deep-copied and filled from the checkpoint with
``load_state_dict(assign=True)``, so their forward is exactly transformers' and nothing
but the requested module ever holds real memory.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..storage.shards import ShardReader
from .factors import Factors
from .projections import PROJECTIONS


class ArchitectureError(ValueError):
    """The model's structure is not one the pipeline can stream."""


@dataclass
class ModelSkeleton:
    """The model's module tree on the meta device plus where its parts live."""

    model_dir: Path
    config: PretrainedConfig
    meta_model: nn.Module  # ForCausalLM on "meta": shapes and classes only
    base_prefix: str  # attribute of the base model inside ForCausalLM, e.g. "model"

    @property
    def base(self) -> nn.Module:
        return getattr(self.meta_model, self.base_prefix)

    @property
    def num_layers(self) -> int:
        return len(self.base.layers)

    def layer_path(self, index: int) -> str:
        return f"{self.base_prefix}.layers.{index}"

    def path_of(self, module: nn.Module) -> str:
        for name, candidate in self.meta_model.named_modules():
            if candidate is module:
                return name
        raise ArchitectureError(f"module {type(module).__name__} is not part of the model")

    def projection_shape(self, projection: str) -> tuple[int, int]:
        """(d1, d2) = (in, out) of a projection in the math layout W = weight.T."""
        linear = self.base.layers[0].get_submodule(projection)
        return linear.in_features, linear.out_features


def load_config(model_dir: str | Path) -> PretrainedConfig:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ArchitectureError(f"{model_dir / 'config.json'} does not exist")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as err:
        raise ArchitectureError(f"cannot read {model_dir / 'config.json'}: {err}") from err


# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole
# process. Two threads inside it at once restore each other's patch in the wrong order and
# leave every later nn.Parameter on "meta" (pipeline tasks run in threads). So the patch is
# taken under a lock, and at most once per model per process thanks to the cache below:
# a thread building real modules then never overlaps it, as each task loads the skeleton
# before it builds anything.
_META_INIT_LOCK = threading.Lock()


def load_skeleton(model_dir: str | Path, attn_implementation: str = "auto") -> ModelSkeleton:
    """The model on the meta device; ``auto`` lets transformers pick the attention kernel
    as ``from_pretrained`` would (sdpa where the architecture supports it).

    Cached per process (callers deep-copy the modules they fill, never mutate the tree);
    the key includes config.json's size and mtime so a rewritten config is read again.
    """
    model_dir = Path(model_dir).resolve()
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ArchitectureError(f"{config_file} does not exist")
    stat = config_file.stat()
    with _META_INIT_LOCK:
        return _cached_skeleton(str(model_dir), attn_implementation, stat.st_size,
                                stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _cached_skeleton(model_dir: str, attn_implementation: str, _size: int,
                     _mtime_ns: int) -> ModelSkeleton:
    config = load_config(model_dir)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as err:
        raise ArchitectureError(f"model_type {config.model_type!r} has no causal-LM class in "
                                "transformers; the pipeline needs a decoder-only model") from err
    kwargs = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    # Parameters on meta (no storage), buffers real: non-persistent buffers such as an
    # embedding scale or rotary frequencies come from the config, not the checkpoint.
    try:
        with init_empty_weights(include_buffers=False):
            meta_model = model_class._from_config(config, dtype=torch.float32, **kwargs)
    except ValueError as err:  # e.g. an attention kernel the architecture lacks
        raise ArchitectureError(f"{model_class.__name__}: {str(err).splitlines()[0]}") from err
    skeleton = ModelSkeleton(Path(model_dir), meta_model.config, meta_model,
                             model_class.base_model_prefix)
    check_structure(skeleton)
    return skeleton


def check_structure(skeleton: ModelSkeleton) -> None:
    """Say exactly which expected module is missing."""
    name = type(skeleton.meta_model).__name__
    base = getattr(skeleton.meta_model, skeleton.base_prefix, None)
    if base is None:
        raise ArchitectureError(f"{name} has no base model attribute {skeleton.base_prefix!r}")
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ArchitectureError(f"{name} has no decoder layers at "
                                f"{skeleton.base_prefix}.layers (expected an nn.ModuleList)")
    for index, layer in enumerate(layers):
        for projection in PROJECTIONS:
            try:
                module = layer.get_submodule(projection)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                raise ArchitectureError(
                    f"{name}: expected an nn.Linear at {skeleton.layer_path(index)}.{projection} "
                    f"in {type(layer).__name__}; this architecture cannot be streamed")
    if base.get_input_embeddings() is None:
        raise ArchitectureError(f"{name} has no input embedding module")


def build_module(skeleton: ModelSkeleton, reader: ShardReader, path: str,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """Materialise the submodule at ``path`` (e.g. ``model.layers.3``) from the checkpoint."""
    meta = skeleton.meta_model.get_submodule(path)
    module = copy.deepcopy(meta)
    expected = {f"{path}.{key}": tuple(value.shape) for key, value in meta.state_dict().items()}
    for key in expected:
        if key not in reader:
            raise ArchitectureError(f"checkpoint in {reader.model_dir} lacks tensor {key} "
                                    f"expected by {type(meta).__name__}")
    tensors = reader.load(expected, dtype=dtype, expected_shapes=expected)
    state = {key[len(path) + 1:]: tensors[key].to(device) for key in expected}
    module.load_state_dict(state, strict=True, assign=True)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise ArchitectureError(f"{path}.{name} of {type(meta).__name__} is not stored in "
                                    "the checkpoint and cannot be rebuilt from the config")
    module.requires_grad_(False)
    return module.eval()


def build_block(skeleton: ModelSkeleton, reader: ShardReader, index: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> nn.Module:
    """Decoder layer ``index`` with its dense checkpoint weights."""
    return build_module(skeleton, reader, skeleton.layer_path(index), dtype, device)


def build_embedding(skeleton: ModelSkeleton, reader: ShardReader, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> nn.Module:
    path = skeleton.path_of(skeleton.base.get_input_embeddings())
    return build_module(skeleton, reader, path, dtype, device)


def build_final_norm(skeleton: ModelSkeleton, reader: ShardReader, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> nn.Module:
    norm = getattr(skeleton.base, "norm", None)
    if norm is None:
        raise ArchitectureError(f"{type(skeleton.base).__name__} has no final norm at "
                                f"{skeleton.base_prefix}.norm")
    return build_module(skeleton, reader, skeleton.path_of(norm), dtype, device)


def build_rotary(skeleton: ModelSkeleton, device: torch.device | str = "cpu") -> nn.Module | None:
    """The model's rotary module (its buffers are real in the skeleton: they come from the
    config, not the checkpoint)."""
    rotary = getattr(skeleton.base, "rotary_emb", None)
    if rotary is None:
        return None
    return copy.deepcopy(rotary).to(device).eval()


def weight_matrix(block: nn.Module, projection: str) -> torch.Tensor:
    """W in the math layout (d1 x d2 = in x out), i.e. ``linear.weight.T``."""
    return block.get_submodule(projection).weight.detach().T


def apply_factors(block: nn.Module, factors: dict[str, Factors]) -> nn.Module:
    """Replace projections' weights by their reconstructions D S (for compressed propagation)."""
    for projection, factor in factors.items():
        linear = block.get_submodule(projection)
        dense = factor.dense().T.to(dtype=linear.weight.dtype, device=linear.weight.device)
        linear.weight = nn.Parameter(dense.contiguous(), requires_grad=False)
    return block
