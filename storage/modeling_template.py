"""CoSpaDi / SVD-LLM compressed causal LM, loadable with plain transformers.

cospadi copies this file verbatim into a compressed checkpoint as ``modeling_cospadi.py``,
with ``cospadi_kernels.py`` (the optional fused Triton kernel) beside it; it imports nothing
but torch and transformers (and triton, through that file, when installed). ``config.json``
keeps the original ``model_type``, adds ``auto_map`` pointing ``AutoModelForCausalLM`` here
and a ``cospadi`` section listing the compressed projections::

    "cospadi": {"format": "cospadi-model", "version": 2, "modules": {
        "model.layers.0.self_attn.q_proj": {"kind": "dictionary", "d1": in, "d2": out,
                                            "k": atoms, "s": nnz per column, "bias": false},
        "model.layers.1.self_attn.q_proj": {..., "dictionary_from": "<module owning it>"},
        "model.layers.0.mlp.up_proj": {..., "support": "block64"},
        "model.layers.0.mlp.down_proj": {"kind": "lowrank", "d1": .., "d2": .., "r": ..},
        "model.layers.1.mlp.down_proj": {..., "left_from": "<module owning it>"},
        "model.layers.1.self_attn.o_proj": {"kind": "masa", "d1": .., "d2": .., "atoms": S,
                                            "r": .., "atoms_from": "<module owning them>"?}}}

``CospadiForCausalLM`` builds the architecture's own ForCausalLM class (looked up from
``model_type`` in transformers' auto mapping) and swaps each listed ``nn.Linear`` for a
compressed module whose tensors (``dictionary``/``mask``/``values14``/``bias``,
``dictionary``/``index``/``values``/``bias`` for block supports, or
``left``/``right``/``bias``) load from the shards by name like any weight. Everything else
(embeddings, norms, lm_head, tying, generate) is the original architecture's code.

Packed codes (see cospadi's storage/sparse_format.py, the writer): ``mask`` is the k x d2
support bit-mask flattened column-major (bit ``j * k + i`` = atom i used by output column j),
least significant bit first; ``values14`` is a little-endian stream of 14-bit codes (the top
14 bits of a bf16), one per set bit in mask order. Block supports (``"support":
"block<B>"``): ``index`` (int16, d2 / B x s) lists the atoms block b's B columns share,
``values`` (d2 / B x s x B) their coefficients.

The dense factors are stored transposed, in the layout ``nn.functional.linear`` takes (as
``nn.Linear.weight`` is): ``dictionary`` is D^T (k x d1), ``left`` L^T (r x d1), ``right``
R^T (d2 x r). ``x @ D`` on a row-major d1 x k matrix runs up to 1.6x slower on CPU at batch 1.

Runtime form: what is loaded is what is kept. The packed codes stay packed (nothing dense
k x d2 survives a call), the dictionary (and low-rank factors) are held once, in the load
dtype, as stored: no per-call cast, copy or re-layout.
On CUDA with Triton a fused kernel multiplies by the packed codes; elsewhere the codes are
decoded per call, a bounded chunk of columns at a time (slow at small batch: a block
support is the fast CPU form).
"""

import math

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

try:  # optional: the fused kernel file beside this one (needs triton)
    from .cospadi_kernels import AVAILABLE as _KERNEL_AVAILABLE
    from .cospadi_kernels import codes_matmul as _kernel_codes_matmul
except ImportError:
    _KERNEL_AVAILABLE = False
    _kernel_codes_matmul = None

MODEL_FORMAT = "cospadi-model"
MODEL_VERSION = 2  # 2: dictionary and low-rank factors stored transposed (linear's layout)
DECODE_CHUNK = 1 << 22  # elements of dense codes decoded at once (8 MiB in bf16)
SMALL_BATCH = 16  # rows up to which block codes are applied sparsely (gather + bmm)
_BYTE_BITS = torch.arange(8, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, k: int, d2: int) -> torch.Tensor:
    """Bool d2 x k: row j holds the atoms output column j uses."""
    shifts = _BYTE_BITS.to(mask.device)
    bits = ((mask.reshape(-1, 1) >> shifts) & 1).bool().reshape(-1)
    return bits[: k * d2].reshape(d2, k)


def unpack_values14(values14: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n 14-bit codes of a byte stream as ``dtype`` (exact for bf16 and float32)."""
    b = nn.functional.pad(values14.reshape(-1), (0, (-values14.numel()) % 7))
    b = b.reshape(-1, 7).to(torch.int32)  # 7 bytes = 4 codes
    codes = torch.stack([
        b[:, 0] | (b[:, 1] & 0x3F) << 8,
        b[:, 1] >> 6 | b[:, 2] << 2 | (b[:, 3] & 0x0F) << 10,
        b[:, 3] >> 4 | b[:, 4] << 4 | (b[:, 5] & 0x03) << 12,
        b[:, 5] >> 2 | b[:, 6] << 6], dim=1).reshape(-1)[:n]
    # a code is the top 14 bits of a float32: shift into place and reinterpret
    return (codes << 18).view(torch.float32).to(dtype)


def decode_codes(mask: torch.Tensor, values14: torch.Tensor, k: int, d2: int, s: int,
                 dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Dense S^T rows ``[start, stop)`` (output columns), the layout ``linear`` takes.

    ``start`` must be a multiple of 8, so that both the mask and the value stream of the
    slice begin on a byte boundary (8 columns = 8 k bits = 14 s bytes).
    """
    stop = d2 if stop is None else stop
    if start % 8:
        raise ValueError(f"decode start {start} is not a multiple of 8")
    cols = stop - start
    bits = unpack_mask(mask[start * k // 8: math.ceil(stop * k / 8)], k, cols)
    first = start * s * 14 // 8
    values = unpack_values14(values14[first: first + math.ceil(cols * s * 14 / 8)],
                             cols * s, dtype)
    # masked_scatter walks row-major (column j, then atoms ascending): the values order
    return torch.zeros(cols, k, dtype=dtype, device=mask.device).masked_scatter_(bits, values)


class CospadiDictionaryLinear(nn.Module):
    """``y = (x D) S + b``: a dense ``linear`` to k atoms, then the codes S.

    Holds exactly the stored tensors: the dictionary (unless borrowed from the group's
    owner), the packed codes and the bias. Free supports: ``mask`` + ``values14``, applied by
    the fused Triton kernel on CUDA, else decoded per call in chunks of columns. Block
    supports: ``index`` + ``values``, applied as one gather + batched matmul at small batch
    (decode) or through a per-call dense decode at large batch (prefill).
    """

    def __init__(self, d1: int, d2: int, k: int, s: int, bias: bool, owns_dictionary: bool,
                 support: str = "free"):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = d1, d2, k, s
        self.support = support
        self.block = int(support[len("block"):]) if support.startswith("block") else 0
        if owns_dictionary:
            self.dictionary = nn.Parameter(torch.empty(k, d1))  # D^T
        else:
            self.register_parameter("dictionary", None)
        if self.block:
            if d2 % self.block:
                raise ValueError(f"{d2} outputs are not a multiple of the block size "
                                 f"{self.block}")
            self.register_buffer("index", torch.empty(d2 // self.block, s, dtype=torch.int16))
            self.values = nn.Parameter(torch.empty(d2 // self.block, s, self.block))
        else:
            self.register_buffer("mask", torch.empty(math.ceil(k * d2 / 8), dtype=torch.uint8))
            self.register_buffer("values14", torch.empty(math.ceil(14 * s * d2 / 8),
                                                         dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(d2)) if bias else None
        # A plain attribute (not a submodule): never saved, never moved by .to().
        object.__setattr__(self, "_lender", None)

    def borrow_dictionary(self, lender: "CospadiDictionaryLinear") -> None:
        """Share ``lender``'s dictionary (a group dictionary stored once)."""
        object.__setattr__(self, "_lender", lender)

    def get_dictionary(self) -> torch.Tensor:
        return self.dictionary if self._lender is None else self._lender.dictionary

    def prepare(self) -> None:
        """Check the loaded codes once (a bad mask would misplace every later value)."""
        if self.block:
            if int(self.index.min()) < 0 or int(self.index.max()) >= self.k:
                raise ValueError(f"block support index outside [0, {self.k})")
            return
        counts = unpack_mask(self.mask, self.k, self.out_features).sum(dim=1)
        if (counts != self.s).any():
            raise ValueError(f"support mask must set s={self.s} atoms per column, found "
                             f"{int(counts.min())}..{int(counts.max())}")

    def codes_product(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ S`` for z of shape N x k."""
        if self.block:
            return self._block_product(z)
        if z.is_cuda and _KERNEL_AVAILABLE:
            return _kernel_codes_matmul(z, self.mask, self.values14, self.k, self.s,
                                        self.out_features)
        step = max(8, DECODE_CHUNK // max(self.k, 1) // 8 * 8)
        parts = [nn.functional.linear(z, decode_codes(
                     self.mask, self.values14, self.k, self.out_features, self.s, z.dtype,
                     start, min(start + step, self.out_features)))
                 for start in range(0, self.out_features, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _block_product(self, z: torch.Tensor) -> torch.Tensor:
        values = self.values if self.values.dtype == z.dtype else self.values.to(z.dtype)
        blocks, s, width = values.shape
        index = self.index.to(torch.int64)
        if z.shape[0] <= SMALL_BATCH:
            gathered = z[:, index]  # N x blocks x s
            return torch.bmm(gathered.transpose(0, 1), values).transpose(0, 1).reshape(
                z.shape[0], blocks * width)
        step = max(1, DECODE_CHUNK // max(self.k * width, 1))
        parts = []
        for start in range(0, blocks, step):
            stop = min(start + step, blocks)
            dense_t = z.new_zeros(stop - start, width, self.k)
            dense_t.scatter_(2, index[start:stop, None, :].expand(-1, width, -1),
                             values[start:stop].transpose(1, 2))
            parts.append(nn.functional.linear(z, dense_t.reshape(-1, self.k)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dictionary_t = self.get_dictionary()  # k x d1
        flat = x.reshape(-1, self.in_features).to(dictionary_t.dtype)
        y = self.codes_product(nn.functional.linear(flat, dictionary_t))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.k}, s={self.s}, support={self.support}, "
                f"bias={self.bias is not None}, shared_dictionary={self._lender is not None}")


class CospadiLowRankLinear(nn.Module):
    """``y = (x L) R + b`` (SVD-LLM factors); a group's shared L is held once."""

    def __init__(self, d1: int, d2: int, r: int, bias: bool, owns_left: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.r = d1, d2, r
        if owns_left:
            self.left = nn.Parameter(torch.empty(r, d1))  # L^T
        else:
            self.register_parameter("left", None)
        self.right = nn.Parameter(torch.empty(d2, r))  # R^T
        self.bias = nn.Parameter(torch.empty(d2)) if bias else None
        object.__setattr__(self, "_lender", None)

    def borrow_left(self, lender: "CospadiLowRankLinear") -> None:
        """Share ``lender``'s left factor (a group factor stored once)."""
        object.__setattr__(self, "_lender", lender)

    def get_left(self) -> torch.Tensor:
        return self.left if self._lender is None else self._lender.left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left_t = self.get_left()
        flat = x.reshape(-1, self.in_features).to(left_t.dtype)
        y = nn.functional.linear(nn.functional.linear(flat, left_t), self.right)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, bias={self.bias is not None}, "
                f"shared_left={self._lender is not None}")


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
                                       bool(spec.get("bias")), "dictionary_from" not in spec,
                                       spec.get("support", "free"))
    if spec["kind"] == "lowrank":
        return CospadiLowRankLinear(spec["d1"], spec["d2"], spec["r"], bool(spec.get("bias")),
                                    "left_from" not in spec)
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
        if "left_from" in spec:
            built[name].borrow_left(built[spec["left_from"]])


def prepare_runtime(model: nn.Module) -> nn.Module:
    """Check every compressed module's loaded codes (nothing is copied)."""
    for module in model.modules():
        if isinstance(module, CospadiDictionaryLinear):
            module.prepare()
    return model


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
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        prepare_runtime(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @classmethod
    def _from_config(cls, config, **kwargs):
        if cls is CospadiForCausalLM:
            return compressed_class(config)._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)
