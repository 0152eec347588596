"""One safetensors file per decoder block holding the compact factors of its projections.

Tensor names are the module path plus a suffix, exactly the names the assembled model uses:

- dictionary kind: ``<module>.dictionary`` (bf16, d1 x k), ``<module>.mask`` and
  ``<module>.values14`` (uint8, see ``sparse_format``);
- dictionary kind with a ``block<B>`` support (header ``"support": "block<B>"``, see
  stages/supports.py): ``<module>.dictionary`` as above, ``<module>.index`` (int16,
  d2 / B x s: the atoms, ascending, that block b's columns use) and ``<module>.values``
  (bf16, d2 / B x s x B: ``values[b, t, c] = S[index[b, t], b B + c]``); a ``2:4``
  support is stored like a free one (mask + values14) with ``"support": "2:4"``;
- low-rank kind: ``<module>.left`` (bf16, d1 x r), ``<module>.right`` (bf16, r x d2);
- masa kind: ``<module>.atoms`` (bf16, S x d2 x d1: torch's out x in layout, the group's
  shared atoms, stored in every member's file), ``<module>.coefficients`` (float32, S) and
  ``<module>.left`` / ``<module>.right`` as low-rank (tensors of size zero are left out:
  no atoms when S = 0, no correction when r = 0);
- optional ``<module>.bias`` (d2, dtype as given).

Modules whose dictionaries (or low-rank left factors) are equal, a shared group factor,
store it once, under the first such module in sorted order; the others name it in their
header entry (``dictionary_from`` / ``left_from``).

The safetensors metadata holds a single key, ``cospadi``, whose value is sorted JSON::

    {"format": "cospadi-factors", "version": 1, "metadata": {...caller's...},
     "modules": {"<module>": {"kind": "dictionary", "d1": .., "d2": .., "k": .., "s": ..,
                              "bias": false, "dictionary_from": "<owner module>"?,
                              "diagnostics": {"error": .., "svd_llm_error": ..}?},
                 "<module>": {"kind": "lowrank", "d1": .., "d2": .., "r": .., "bias": false},
                 "<module>": {"kind": "masa", "d1": .., "d2": .., "atoms": S, "r": ..,
                              "bias": false}}}

A single key matters: safetensors writes metadata keys in hash order, so several keys would
make the bytes differ from run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..stages.factors import DictionaryFactors, Factors, LowRankFactors, MasaFactors
from .atomic import write_with
from .sparse_format import mask_nbytes, pack_codes, unpack_codes, values_nbytes

SHARED_LEAF = {"dictionary": "dictionary", "lowrank": "left"}  # the factor a group shares
FORMAT = "cospadi-factors"
VERSION = 1
METADATA_KEY = "cospadi"
STORE_DTYPE = torch.bfloat16  # dictionary / low-rank factors on disk
COEFFICIENT_DTYPE = torch.float32  # MASA coefficients (S per module)


class FactorFileError(ValueError):
    """A factor file is missing, unreadable or inconsistent (the message names the file)."""


@dataclass
class BlockFile:
    factors: dict[str, Factors]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def tensor_digest(tensor: torch.Tensor) -> str:
    """Content hash (shape + raw bytes): equal digests mean a dictionary can be stored once."""
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(str(tuple(tensor.shape)).encode() + data).hexdigest()


def encode_module(name: str, factors: Factors) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header entry and on-disk tensors of one module's factors."""
    if isinstance(factors, DictionaryFactors):
        d1, k = factors.dictionary.shape
        s, d2 = factors.support.shape
        if factors.values.shape != (s, d2):
            raise ValueError(f"{name}: values {tuple(factors.values.shape)} != support {(s, d2)}")
        spec = {"kind": "dictionary", "d1": d1, "d2": d2, "k": k, "s": s}
        tensors = {
            f"{name}.dictionary": factors.dictionary.detach().cpu().to(STORE_DTYPE).contiguous()}
        if factors.structure.startswith("block"):
            spec["support"] = factors.structure
            tensors.update(pack_block_codes(name, factors))
            return spec, tensors
        if factors.structure != "free":
            spec["support"] = factors.structure
        packed = pack_codes(factors.support, factors.values, k)
        tensors[f"{name}.mask"] = packed["mask"]
        tensors[f"{name}.values14"] = packed["values14"]
        return spec, tensors
    if isinstance(factors, LowRankFactors):
        d1, r = factors.left.shape
        if factors.right.shape[0] != r:
            raise ValueError(f"{name}: left {tuple(factors.left.shape)} and right "
                             f"{tuple(factors.right.shape)} disagree on the rank")
        d2 = factors.right.shape[1]
        tensors = {
            f"{name}.left": factors.left.detach().cpu().to(STORE_DTYPE).contiguous(),
            f"{name}.right": factors.right.detach().cpu().to(STORE_DTYPE).contiguous(),
        }
        return {"kind": "lowrank", "d1": d1, "d2": d2, "r": r}, tensors
    if isinstance(factors, MasaFactors):
        return _encode_masa(name, factors)
    raise TypeError(f"{name}: unsupported factors type {type(factors).__name__}")


def _encode_masa(name: str, factors: MasaFactors) -> tuple[dict, dict[str, torch.Tensor]]:
    s, d1, d2 = factors.atoms.shape
    r = factors.left.shape[1]
    if factors.coefficients.shape != (s,) or factors.left.shape[0] != d1 or \
            factors.right.shape != (r, d2):
        raise ValueError(f"{name}: MASA factors disagree: atoms {tuple(factors.atoms.shape)}, "
                         f"coefficients {tuple(factors.coefficients.shape)}, left "
                         f"{tuple(factors.left.shape)}, right {tuple(factors.right.shape)}")
    tensors = {}
    if s:
        tensors[f"{name}.atoms"] = factors.atoms.detach().cpu().transpose(1, 2) \
            .to(STORE_DTYPE).contiguous()
        tensors[f"{name}.coefficients"] = factors.coefficients.detach().cpu() \
            .to(COEFFICIENT_DTYPE).contiguous()
    if r:
        tensors[f"{name}.left"] = factors.left.detach().cpu().to(STORE_DTYPE).contiguous()
        tensors[f"{name}.right"] = factors.right.detach().cpu().to(STORE_DTYPE).contiguous()
    return {"kind": "masa", "d1": d1, "d2": d2, "atoms": s, "r": r}, tensors


def _masa_tensors(name: str, spec: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    d1, d2, s, r = spec["d1"], spec["d2"], spec["atoms"], spec["r"]
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if s:
        out[f"{name}.coefficients"] = (COEFFICIENT_DTYPE, (s,))
        if "atoms_from" not in spec:
            out[f"{name}.atoms"] = (STORE_DTYPE, (s, d2, d1))
    if r:
        out[f"{name}.left"] = (STORE_DTYPE, (d1, r))
        out[f"{name}.right"] = (STORE_DTYPE, (r, d2))
    return out


def block_size(spec: dict) -> int:
    """Columns per block of a ``block<B>`` support, 0 for bit-mask supports."""
    support = spec.get("support", "free")
    return int(support[len("block"):]) if support.startswith("block") else 0


def pack_block_codes(name: str, factors: DictionaryFactors) -> dict[str, torch.Tensor]:
    """``index`` (int16) and ``values`` (bf16) of codes whose column blocks share supports."""
    block = int(factors.structure[len("block"):])
    s, d2 = factors.support.shape
    if d2 % block:
        raise ValueError(f"{name}: {d2} columns are not a multiple of the block size {block}")
    support = factors.support.detach().cpu().reshape(s, d2 // block, block)
    if not (support == support[:, :, :1]).all():
        raise ValueError(f"{name}: the columns of a block do not share one support")
    if factors.k > 2 ** 15:
        raise ValueError(f"{name}: k = {factors.k} atoms do not fit an int16 index")
    values = factors.values.detach().cpu().reshape(s, d2 // block, block).permute(1, 0, 2)
    return {f"{name}.index": support[:, :, 0].T.to(torch.int16).contiguous(),
            f"{name}.values": values.to(STORE_DTYPE).contiguous()}


def unpack_block_codes(index: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_block_codes`: ``(support int64, values float32)``, s x d2."""
    blocks, s, block = values.shape
    support = index.to(torch.int64).T.repeat_interleave(block, dim=1)
    return support, values.float().permute(1, 0, 2).reshape(s, blocks * block)


def expected_tensors(name: str, spec: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each tensor a header entry promises (a borrowed dictionary excluded)."""
    d1, d2 = spec["d1"], spec["d2"]
    if spec["kind"] == "dictionary":
        k, s = spec["k"], spec["s"]
        block = block_size(spec)
        if block:
            if d2 % block:
                raise ValueError(f"{d2} columns are not a multiple of the block size {block}")
            out = {f"{name}.index": (torch.int16, (d2 // block, s)),
                   f"{name}.values": (STORE_DTYPE, (d2 // block, s, block))}
        else:
            out = {f"{name}.mask": (torch.uint8, (mask_nbytes(k, d2),)),
                   f"{name}.values14": (torch.uint8, (values_nbytes(s, d2),))}
        if "dictionary_from" not in spec:
            out[f"{name}.dictionary"] = (STORE_DTYPE, (d1, k))
    elif spec["kind"] == "lowrank":
        r = spec["r"]
        out = {f"{name}.right": (STORE_DTYPE, (r, d2))}
        if "left_from" not in spec:
            out[f"{name}.left"] = (STORE_DTYPE, (d1, r))
    elif spec["kind"] == "masa":
        out = _masa_tensors(name, spec)
    else:
        raise ValueError(f"unknown kind {spec['kind']!r} for {name}")
    return out


def write_block_factors(path: str | os.PathLike, factors: dict[str, Factors],
                        metadata: dict | None = None,
                        biases: dict[str, torch.Tensor] | None = None,
                        diagnostics: dict[str, dict] | None = None) -> None:
    """Write one block's factors atomically; the same input always gives the same bytes.

    ``diagnostics``: per module, figures kept in its header entry (and carried into the
    assembled model's config by assembly), e.g. the solver's achieved error."""
    biases = biases or {}
    diagnostics = diagnostics or {}
    unknown = set(biases) - set(factors)
    if unknown:
        raise ValueError(f"biases given for modules without factors: {sorted(unknown)}")
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[tuple[str, str], str] = {}  # (kind, digest) -> module storing it
    for name in sorted(factors):
        spec, module_tensors = encode_module(name, factors[name])
        if spec["kind"] in SHARED_LEAF:  # MASA's atoms are shared at assembly
            leaf = SHARED_LEAF[spec["kind"]]
            key = f"{name}.{leaf}"
            digest = (spec["kind"], tensor_digest(module_tensors[key]))
            if digest in owners:
                spec[f"{leaf}_from"] = owners[digest]
                del module_tensors[key]
            else:
                owners[digest] = name
        if name in diagnostics:
            spec["diagnostics"] = dict(diagnostics[name])
        bias = biases.get(name)
        spec["bias"] = bias is not None
        if bias is not None:
            if tuple(bias.shape) != (spec["d2"],):
                raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({spec['d2']},)")
            module_tensors[f"{name}.bias"] = bias.detach().cpu().contiguous()
        modules[name] = spec
        tensors.update(module_tensors)
    header = {"format": FORMAT, "version": VERSION, "modules": modules,
              "metadata": metadata or {}}
    meta = {METADATA_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_block_header(path: str | os.PathLike) -> dict:
    """The parsed ``cospadi`` header of a factor file, checked against its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FactorFileError(f"factor file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            stored = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: (sl.get_dtype(), tuple(sl.get_shape())) for key, sl in stored.items()}
    except (SafetensorError, OSError) as err:
        raise FactorFileError(f"factor file {path} is not a readable safetensors file: {err}") \
            from err
    if raw is None:
        raise FactorFileError(f"factor file {path} has no '{METADATA_KEY}' metadata")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise FactorFileError(f"factor file {path} has corrupt metadata: {err}") from err
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise FactorFileError(f"factor file {path} is not {FORMAT} version {VERSION}")
    _check_tensors(path, header["modules"], shapes)
    return header


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32",
                       torch.int16: "I16"}


def _check_tensors(path: Path, modules: dict, shapes: dict) -> None:
    wanted: set[str] = set()
    for name, spec in modules.items():
        try:
            expected = expected_tensors(name, spec)
        except (KeyError, ValueError) as err:
            raise FactorFileError(f"factor file {path}: bad header entry for {name}: {err}") \
                from err
        leaf = SHARED_LEAF.get(spec["kind"], "")
        owner = spec.get(f"{leaf}_from")
        if owner is not None and not can_lend(modules.get(owner), spec):
            raise FactorFileError(f"factor file {path}: {name} borrows the {leaf} of "
                                  f"{owner}, which does not store one")
        if spec.get("bias"):
            expected[f"{name}.bias"] = (None, (spec["d2"],))
        for key, (dtype, shape) in expected.items():
            if key not in shapes:
                raise FactorFileError(f"factor file {path} lacks tensor {key}")
            got_dtype, got_shape = shapes[key]
            if got_shape != shape or (dtype is not None
                                      and got_dtype != _SAFETENSORS_DTYPES[dtype]):
                raise FactorFileError(f"factor file {path}: {key} is {got_dtype} {got_shape}, "
                                      f"expected {shape}")
        wanted.update(expected)
    extra = set(shapes) - wanted
    if extra:
        raise FactorFileError(f"factor file {path} holds unexpected tensors {sorted(extra)}")


def can_lend(owner: dict | None, borrower: dict) -> bool:
    """``owner`` stores the shared factor ``borrower`` names, with the right shape."""
    kind = borrower["kind"]
    width = "k" if kind == "dictionary" else "r"
    return (owner is not None and owner.get("kind") == kind
            and f"{SHARED_LEAF[kind]}_from" not in owner
            and (owner.get("d1"), owner.get(width)) == (borrower["d1"], borrower[width]))


def read_block_file(path: str | os.PathLike) -> BlockFile:
    """Factors (float32; values as stored in 14 bits), biases and caller metadata.

    Modules sharing a dictionary get the same tensor back, as the solver handed them out.
    """
    header = read_block_header(path)
    factors: dict[str, Factors] = {}
    biases: dict[str, torch.Tensor] = {}
    dictionaries: dict[str, torch.Tensor] = {}
    lefts: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name, spec in sorted(header["modules"].items()):
                if spec["kind"] == "dictionary":
                    owner = spec.get("dictionary_from", name)
                    if owner not in dictionaries:
                        dictionaries[owner] = handle.get_tensor(f"{owner}.dictionary").float()
                    if block_size(spec):
                        support, values = unpack_block_codes(
                            handle.get_tensor(f"{name}.index"),
                            handle.get_tensor(f"{name}.values"))
                    else:
                        support, values = unpack_codes(handle.get_tensor(f"{name}.mask"),
                                                       handle.get_tensor(f"{name}.values14"),
                                                       spec["k"], spec["d2"], spec["s"])
                    factors[name] = DictionaryFactors(dictionaries[owner], support, values,
                                                      spec.get("support", "free"))
                elif spec["kind"] == "masa":
                    factors[name] = _read_masa(handle, name, spec)
                else:
                    owner = spec.get("left_from", name)
                    if owner not in lefts:
                        lefts[owner] = handle.get_tensor(f"{owner}.left").float()
                    factors[name] = LowRankFactors(lefts[owner],
                                                   handle.get_tensor(f"{name}.right").float())
                if spec.get("bias"):
                    biases[name] = handle.get_tensor(f"{name}.bias")
    except (SafetensorError, ValueError, KeyError) as err:
        raise FactorFileError(f"factor file {path} is corrupt: {err}") from err
    return BlockFile(factors, biases, header.get("metadata", {}))


def _read_masa(handle, name: str, spec: dict) -> MasaFactors:
    d1, d2, s, r = spec["d1"], spec["d2"], spec["atoms"], spec["r"]
    if s:
        atoms = handle.get_tensor(f"{name}.atoms").float().transpose(1, 2).contiguous()
        coefficients = handle.get_tensor(f"{name}.coefficients").float()
    else:
        atoms, coefficients = torch.zeros(0, d1, d2), torch.zeros(0)
    if r:
        left = handle.get_tensor(f"{name}.left").float()
        right = handle.get_tensor(f"{name}.right").float()
    else:
        left, right = torch.zeros(d1, 0), torch.zeros(0, d2)
    return MasaFactors(atoms, coefficients, left, right)


def read_block_factors(path: str | os.PathLike) -> dict[str, Factors]:
    """The factors of every module in a block file (see :func:`read_block_file`)."""
    return read_block_file(path).factors
