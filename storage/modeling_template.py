"""CoSpaDi / SVD-LLM compressed causal LM, loadable with plain transformers.

cospadi copies this file verbatim into a compressed checkpoint as ``modeling_cospadi.py``;
it must import nothing but torch and transformers. ``config.json`` keeps the original
``model_type``, adds ``auto_map`` pointing ``AutoModelForCausalLM`` here and a ``cospadi``
section listing the compressed projections::

    "cospadi": {"format": "cospadi-model", "version": 1, "modules": {
        "model.layers.0.self_attn.q_proj": {"kind": "dictionary", "d1": in, "d2": out,
                                            "k": atoms, "s": nnz per column, "bias": false},
        "model.layers.1.self_attn.q_proj": {..., "dictionary_from": "<module owning it>"},
        "model.layers.0.mlp.down_proj": {"kind": "lowrank", "d1": .., "d2": .., "r": ..},
        "model.layers.1.self_attn.o_proj": {"kind": "masa", "d1": .., "d2": .., "atoms": S,
                                            "r": .., "atoms_from": "<module owning them>"?}}}

``CospadiForCausalLM`` builds the architecture's own ForCausalLM class (looked up from
``model_type`` in transformers' auto mapping) and swaps each listed ``nn.Linear`` for a
compressed module whose tensors (``dictionary``/``mask``/``values14``/``bias`` or
``left``/``right``/``bias``) load from the shards by name like any weight. Everything else
(embeddings, norms, lm_head, tying, generate) is the original architecture's code.

Packed codes (see cospadi's storage/sparse_format.py, the writer): ``mask`` is the k x d2
support bit-mask flattened column-major (bit ``j * k + i`` = atom i used by column j), least
significant bit first; ``values14`` is a little-endian stream of 14-bit codes (the top 14
bits of a bf16), one per set bit in mask order.
"""

import math

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

MODEL_FORMAT = "cospadi-model"
MODEL_VERSION = 1


def unpack_mask(mask: torch.Tensor, k: int, d2: int) -> torch.Tensor:
    """Bool d2 x k: row j holds the atoms output column j uses."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = ((mask.reshape(-1, 1) >> shifts) & 1).bool().reshape(-1)
    return bits[: k * d2].reshape(d2, k)


def unpack_values14(values14: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n 14-bit codes as ``dtype`` (exact for bf16 and float32)."""
    packed = nn.functional.pad(values14.reshape(-1), (0, (-values14.numel()) % 7))
    groups = packed.reshape(-1, 7).to(torch.int64)
    byte_shift = torch.arange(7, dtype=torch.int64, device=values14.device) * 8
    code_shift = torch.arange(4, dtype=torch.int64, device=values14.device) * 14
    words = (groups << byte_shift).sum(dim=1)  # 4 codes = 56 bits per int64
    codes = ((words[:, None] >> code_shift) & 0x3FFF).reshape(-1)[:n]
    half = (codes << 2) & 0xFFFF
    half = torch.where(half >= 0x8000, half - 0x10000, half)  # int16 two's complement
    return half.to(torch.int16).view(torch.bfloat16).to(dtype)


def decode_codes(mask: torch.Tensor, values14: torch.Tensor, k: int, d2: int, s: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Dense S^T (d2 x k), the layout ``nn.functional.linear`` takes as weight."""
    bits = unpack_mask(mask, k, d2)
    if int(bits.sum()) != s * d2:
        raise ValueError(f"support mask sets {int(bits.sum())} bits, expected {s * d2}")
    dense_t = torch.zeros(d2, k, dtype=dtype, device=mask.device)
    # Boolean assignment walks row-major (column j, then atoms ascending): the values order.
    dense_t[bits] = unpack_values14(values14, s * d2, dtype)
    return dense_t


class CospadiDictionaryLinear(nn.Module):
    """``y = (x D) S + b``: a dense matmul to k atoms, then the decoded codes.

    S is decoded once into a dense k x d2 matrix and cached (not saved) per device and
    dtype. A dense S is the smallest runtime form at rho = k / s = 2 (CSR would need 6+ bytes
    per non-zero against 4 here) and a dense GEMM beats sparse kernels at 50 % density; it
    does cost ~k d2 extra elements per module (about half a dense square weight). Set
    ``cache_codes = False`` on a module (or the class) to decode on every call instead:
    memory stays at the packed size, each forward pays the decode.
    """

    cache_codes = True

    def __init__(self, d1: int, d2: int, k: int, s: int, bias: bool, owns_dictionary: bool):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = d1, d2, k, s
        if owns_dictionary:
            self.dictionary = nn.Parameter(torch.empty(d1, k))
        else:
            self.register_parameter("dictionary", None)
        self.register_buffer("mask", torch.empty(math.ceil(k * d2 / 8), dtype=torch.uint8))
        self.register_buffer("values14", torch.empty(math.ceil(14 * s * d2 / 8),
                                                     dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(d2)) if bias else None
        # Plain attributes (not submodules/buffers): never saved, never moved by .to().
        object.__setattr__(self, "_lender", None)
        object.__setattr__(self, "_cache", None)

    def borrow_dictionary(self, lender: "CospadiDictionaryLinear") -> None:
        """Share ``lender``'s dictionary (a group dictionary stored once)."""
        object.__setattr__(self, "_lender", lender)

    def get_dictionary(self) -> torch.Tensor:
        return self.dictionary if self._lender is None else self._lender.dictionary

    def codes_t(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # Keyed on the buffers' identity and version, so loading or moving them invalidates.
        key = (self.mask.data_ptr(), self.mask._version, self.values14.data_ptr(),
               self.values14._version, dtype, device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        dense = decode_codes(self.mask, self.values14, self.k, self.out_features, self.s,
                             dtype).to(device)
        object.__setattr__(self, "_cache", (key, dense) if self.cache_codes else None)
        return dense

    def clear_cache(self) -> None:
        object.__setattr__(self, "_cache", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dictionary = self.get_dictionary().to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x @ dictionary, self.codes_t(x.dtype, x.device), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.k}, s={self.s}, bias={self.bias is not None}, "
                f"shared_dictionary={self._lender is not None}")


class CospadiLowRankLinear(nn.Module):
    """``y = (x L) R + b`` (SVD-LLM factors)."""

    def __init__(self, d1: int, d2: int, r: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.r = d1, d2, r
        self.left = nn.Parameter(torch.empty(d1, r))
        self.right = nn.Parameter(torch.empty(r, d2))
        self.bias = nn.Parameter(torch.empty(d2)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.left.to(x.dtype)) @ self.right.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, bias={self.bias is not None}")


# ---- MASA (matrix atoms shared across layers) -------------------------------------------


class CospadiMasaLinear(nn.Module):
    """``y = x (sum_s c_s A_s)^T + (x L) R + b``: MASA's shared atoms and own correction.

    ``atoms`` (S x out x in) are stored once per group, by the first member; the others
    borrow them. The combined weight is formed inside ``forward`` and dropped when it
    returns, so between calls the module holds only its stored tensors (resident bytes =
    bytes on disk). Tensors of size zero (S = 0 or r = 0) are not registered.
    """

    def __init__(self, d1: int, d2: int, atoms: int, r: int, bias: bool, owns_atoms: bool):
        super().__init__()
        self.in_features, self.out_features, self.num_atoms, self.r = d1, d2, atoms, r
        owned = atoms > 0 and owns_atoms
        self.atoms = nn.Parameter(torch.empty(atoms, d2, d1)) if owned else None
        self.coefficients = nn.Parameter(torch.empty(atoms)) if atoms else None
        self.left = nn.Parameter(torch.empty(d1, r)) if r else None
        self.right = nn.Parameter(torch.empty(r, d2)) if r else None
        self.bias = nn.Parameter(torch.empty(d2)) if bias else None
        object.__setattr__(self, "_lender", None)  # not a submodule: never saved twice

    def borrow_atoms(self, lender: "CospadiMasaLinear") -> None:
        object.__setattr__(self, "_lender", lender)

    def get_atoms(self) -> torch.Tensor:
        return self.atoms if self._lender is None else self._lender.atoms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.num_atoms:
            weight = torch.tensordot(self.coefficients.to(x.dtype),
                                     self.get_atoms().to(x.dtype), dims=1)
            y = nn.functional.linear(x, weight, bias)
            del weight
        else:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
            if bias is not None:
                y = y + bias
        if self.r:
            y = y + (x @ self.left.to(x.dtype)) @ self.right.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"atoms={self.num_atoms}, r={self.r}, bias={self.bias is not None}, "
                f"shared_atoms={self._lender is not None}")


def compressed_module(spec: dict) -> nn.Module:
    if spec["kind"] == "dictionary":
        return CospadiDictionaryLinear(spec["d1"], spec["d2"], spec["k"], spec["s"],
                                       bool(spec.get("bias")), "dictionary_from" not in spec)
    if spec["kind"] == "lowrank":
        return CospadiLowRankLinear(spec["d1"], spec["d2"], spec["r"], bool(spec.get("bias")))
    if spec["kind"] == "masa":
        return CospadiMasaLinear(spec["d1"], spec["d2"], spec["atoms"], spec["r"],
                                 bool(spec.get("bias")), "atoms_from" not in spec)
    raise ValueError(f"unknown compressed module kind {spec['kind']!r}")


def swap_linears(model: nn.Module, section: dict) -> None:
    """Replace every listed ``nn.Linear`` of ``model`` with its compressed module."""
    if section.get("format") != MODEL_FORMAT or section.get("version") != MODEL_VERSION:
        raise ValueError(f"config 'cospadi' section is not {MODEL_FORMAT} v{MODEL_VERSION}")
    built = {}
    for name, spec in sorted(section["modules"].items()):
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, expected nn.Linear")
        if (old.in_features, old.out_features) != (spec["d1"], spec["d2"]):
            raise ValueError(f"{name}: config says {spec['d1']} x {spec['d2']}, the "
                             f"architecture has {old.in_features} x {old.out_features}")
        parent, _, child = name.rpartition(".")
        built[name] = compressed_module(spec)
        setattr(model.get_submodule(parent) if parent else model, child, built[name])
    for name, spec in section["modules"].items():
        if "dictionary_from" in spec:
            built[name].borrow_dictionary(built[spec["dictionary_from"]])
        if "atoms_from" in spec:
            built[name].borrow_atoms(built[spec["atoms_from"]])


def base_causal_lm_class(config) -> type:
    """The architecture's own ForCausalLM class, from transformers' auto mapping."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"transformers has no causal LM for model_type {config.model_type!r}")
    return getattr(transformers, name)


_CLASSES: dict = {}


def compressed_class(config) -> type:
    """``CospadiForCausalLM`` specialised to the architecture of ``config`` (cached)."""
    base = base_causal_lm_class(config)
    if base not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            section = getattr(config, "cospadi", None)
            if not isinstance(section, dict):
                raise ValueError("config has no 'cospadi' section: not a cospadi checkpoint")
            swap_linears(self, section)

        _CLASSES[base] = type("CospadiForCausalLM", (base, CospadiForCausalLM), {
            "__init__": __init__, "__module__": __name__,
            "__doc__": f"{base.__name__} with CoSpaDi / low-rank compressed projections."})
    return _CLASSES[base]


class CospadiForCausalLM(PreTrainedModel, GenerationMixin):
    """Entry point named by ``auto_map``; every instance is really of ``compressed_class``.

    The specialised class inherits from the architecture's class first and from this one
    second, so ``isinstance(model, CospadiForCausalLM)`` holds; the guards below only
    redirect calls made on this generic class itself.
    """

    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies this file along

    def __new__(cls, config, *args, **kwargs):
        if cls is CospadiForCausalLM:
            return compressed_class(config)(config, *args, **kwargs)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if cls is CospadiForCausalLM:
            config = kwargs.get("config")
            if config is None or isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
                config = transformers.AutoConfig.from_pretrained(
                    config or pretrained_model_name_or_path,
                    **{key: kwargs[key] for key in ("cache_dir", "revision", "token",
                                                    "local_files_only", "subfolder")
                       if key in kwargs})
                kwargs["config"] = config
            return compressed_class(config).from_pretrained(pretrained_model_name_or_path,
                                                            *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        if cls is CospadiForCausalLM:
            return compressed_class(config)._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)
