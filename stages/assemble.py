"""Assemble a loadable compressed checkpoint from the original one plus per-block factor files;
export it back to a plain dense checkpoint; report its achieved sizes.

The compressed checkpoint is a Hugging Face model directory: ``config.json`` (the original
config plus ``auto_map`` and a ``cospadi`` section), ``modeling_cospadi.py`` (standalone,
torch + transformers only), sharded safetensors with every uncompressed tensor copied from
the original shards and the compressed tensors named ``<module>.dictionary|mask|values14``
or ``<module>.left|right`` (plus ``<module>.bias``; dictionary, left and right transposed,
the layout ``linear`` takes), ``cospadi_kernels.py`` (the optional fused Triton kernel the
modeling file imports), and the tokenizer / generation files. Output is built in a hidden
sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..storage import cospadi_kernels as sparse_kernels
from ..storage import modeling_template
from ..storage.atomic import fsync_dir, write_json, write_text
from ..storage.factor_files import (
    SHARED_LEAF,
    STORE_DTYPE,
    block_size,
    expected_tensors,
    read_block_header,
    tensor_digest,
    unpack_block_codes,
)
from ..storage.hf_checkpoint import (
    CheckpointError,
    OutTensor,
    TensorInfo,
    TensorSource,
    checkpoint_tensors,
    copy_side_files,
    file_tensors,
    natural_key,
    parse_size,
    write_shards,
)
from ..storage.sparse_format import codes_dense
from .sizing import DENSE_BYTES_PER_PARAM

# dense factors the model stores transposed (factor files keep the math layout)
TRANSPOSED = ("dictionary", "left", "right")
MODELING_FILE = "modeling_cospadi.py"
KERNEL_FILE = "cospadi_kernels.py"  # imported by the modeling file as ``.cospadi_kernels``
AUTO_MAP = {"AutoModelForCausalLM": "modeling_cospadi.CospadiForCausalLM"}
MODEL_FORMAT = modeling_template.MODEL_FORMAT
MODEL_VERSION = modeling_template.MODEL_VERSION
DEFAULT_SHARD = "2GB"


class AssembleError(ValueError):
    """Inputs that cannot make a consistent compressed model."""


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Unreadable checkpoints surface as AssembleError, the CLI's user-error type."""
    try:
        yield
    except CheckpointError as err:
        raise AssembleError(str(err)) from err


@contextlib.contextmanager
def staged_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling folder renamed to ``out_dir`` only once everything inside is durable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)  # a torn earlier attempt
    shutil.rmtree(old, ignore_errors=True)  # one killed between the two renames below
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():  # atomic writes leave mkstemp's 0600: make it readable
            path.chmod(0o644)
        fsync_dir(tmp)  # files were fsynced by their atomic writes
        if out_dir.exists():
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def modeling_source() -> str:
    """The standalone modeling file, verbatim."""
    return Path(modeling_template.__file__).read_text(encoding="utf-8")


def kernel_source() -> str:
    """The optional Triton kernel file the modeling file imports beside itself, verbatim."""
    return Path(sparse_kernels.__file__).read_text(encoding="utf-8")


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise AssembleError(f"{model_dir} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_architecture(config: dict, model_dir: Path) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise AssembleError(f"{model_dir}: model_type {config.get('model_type')!r} has no "
                            "causal LM class in transformers; the modeling file cannot build it")
    if "cospadi" in config:
        raise AssembleError(f"{model_dir} is already a compressed checkpoint")


def _collect_factors(factor_files: list[Path], original: dict[str, TensorInfo]
                     ) -> tuple[dict[str, dict], dict[str, tuple[Path, str]]]:
    """Module specs (final form) and ``{output tensor: (factor file, stored name)}``."""
    specs: dict[str, dict] = {}
    sources: dict[str, tuple[Path, str]] = {}
    for path in factor_files:
        path = Path(path)
        for name, spec in read_block_header(path)["modules"].items():
            if name in specs:
                raise AssembleError(f"{name} has factors in two files (second: {path})")
            weight = original.get(f"{name}.weight")
            if weight is None:
                raise AssembleError(f"{path}: {name}.weight is not in the original checkpoint")
            if weight.shape != (spec["d2"], spec["d1"]):
                raise AssembleError(f"{path}: {name} factors are {spec['d1']} x {spec['d2']} "
                                    f"(in x out), the weight is {weight.shape} (out x in)")
            specs[name] = dict(spec, bias=bool(spec.get("bias")))
            for key in expected_tensors(name, spec):
                sources[key] = (path, key)
            leaf = SHARED_LEAF.get(spec["kind"], "")  # MASA shares its atoms at assembly
            owner = spec.get(f"{leaf}_from") if leaf else None
            if owner is not None:  # resolved to a global owner below
                sources[f"{name}.{leaf}"] = (path, f"{owner}.{leaf}")
            if spec.get("bias"):
                sources[f"{name}.bias"] = (path, f"{name}.bias")
            elif f"{name}.bias" in original:
                specs[name]["bias"] = True  # stays an uncompressed tensor of the original
    return specs, sources


def _allocation_records(factor_files: list[Path]) -> dict[str, dict]:
    """Per-module allocation records the factor tasks left in the files' metadata."""
    records: dict[str, dict] = {}
    for path in factor_files:
        records.update(read_block_header(path).get("metadata", {}).get("allocation", {}))
    return {name: records[name] for name in sorted(records, key=natural_key)}


def _share_factors(specs: dict[str, dict], sources: dict[str, tuple[Path, str]],
                   reader: TensorSource) -> None:
    """Store equal dictionaries / low-rank left factors / MASA atoms once (a group's shared
    factor split over block files)."""
    owners: dict[object, str] = {}
    for name in sorted(specs, key=natural_key):
        spec = specs[name]
        if spec["kind"] == "masa":
            _share_atoms(name, spec, sources, reader, owners)
            continue
        leaf = SHARED_LEAF[spec["kind"]]
        spec.pop(f"{leaf}_from", None)
        width = spec["k"] if spec["kind"] == "dictionary" else spec["r"]
        file, stored = sources[f"{name}.{leaf}"]
        info = TensorInfo(file, STORE_DTYPE, (spec["d1"], width))
        digest = (spec["kind"], tensor_digest(reader.get(info, stored)))
        if digest in owners:
            spec[f"{leaf}_from"] = owners[digest]
            del sources[f"{name}.{leaf}"]
        else:
            owners[digest] = name


def _share_atoms(name: str, spec: dict, sources: dict[str, tuple[Path, str]],
                 reader: TensorSource, owners: dict[object, str]) -> None:
    """MASA: a group's atoms (one copy in each member's factor file) stored once."""
    spec.pop("atoms_from", None)
    if not spec["atoms"]:
        return
    file, stored = sources[f"{name}.atoms"]
    info = TensorInfo(file, STORE_DTYPE, (spec["atoms"], spec["d2"], spec["d1"]))
    digest = "atoms:" + tensor_digest(reader.get(info, stored))
    if digest in owners:
        spec["atoms_from"] = owners[digest]
        del sources[f"{name}.atoms"]
    else:
        owners[digest] = name


@_user_errors()
def assemble_model(model_dir: str | os.PathLike, factor_files: list[str | os.PathLike],
                   out_dir: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_SHARD,
                   overwrite: bool = False) -> Path:
    """Write the compressed checkpoint to ``out_dir`` (see the module docstring)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _read_config(model_dir)
    _check_architecture(config, model_dir)
    original = checkpoint_tensors(model_dir)
    specs, sources = _collect_factors([Path(p) for p in factor_files], original)
    reader = TensorSource()
    try:
        _share_factors(specs, sources, reader)
        out: list[OutTensor] = []
        for name, info in original.items():
            module, _, leaf = name.rpartition(".")
            if name in sources or (module in specs and leaf == "weight"):
                continue  # replaced by factors (a bias from the factor file wins)
            out.append(OutTensor(name, info.nbytes, lambda i=info, n=name: reader.get(i, n)))
        headers: dict[Path, dict] = {}
        for name, (file, stored) in sources.items():
            if file not in headers:
                headers[file] = file_tensors(file)
            info = headers[file][stored]
            module, _, leaf = name.rpartition(".")
            if leaf in TRANSPOSED and specs[module]["kind"] != "masa":  # linear's layout
                out.append(OutTensor(name, info.nbytes, lambda i=info, s=stored:
                                     reader.get(i, s).T.contiguous()))
            else:
                out.append(OutTensor(name, info.nbytes,
                                     lambda i=info, s=stored: reader.get(i, s)))
        section = {"format": MODEL_FORMAT, "version": MODEL_VERSION,
                   "modules": {name: specs[name] for name in sorted(specs, key=natural_key)}}
        allocation = _allocation_records([Path(p) for p in factor_files])
        if allocation:  # --allocation global: chosen budget, predicted and achieved errors
            section["allocation"] = allocation
        config = dict(config, auto_map={**config.get("auto_map", {}), **AUTO_MAP},
                      cospadi=section)
        with staged_dir(out_dir, overwrite) as tmp:
            write_shards(tmp, out, parse_size(max_shard_size))
            write_json(tmp / "config.json", config)
            write_text(tmp / MODELING_FILE, modeling_source())
            write_text(tmp / KERNEL_FILE, kernel_source())
            copy_side_files(model_dir, tmp, skip=(MODELING_FILE, KERNEL_FILE))
    finally:
        reader.close()
    return out_dir


def _dense_weight(name: str, spec: dict, tensors: dict[str, TensorInfo],
                  reader: TensorSource) -> torch.Tensor:
    """``(D S).T`` or ``(L R).T`` in float32, torch's out x in layout."""
    def get(key: str) -> torch.Tensor:
        return reader.get(tensors[key], key)

    if spec["kind"] == "dictionary":
        owner = spec.get("dictionary_from", name)
        dictionary = get(f"{owner}.dictionary").float().T  # stored as D^T
        if block_size(spec):
            support, values = unpack_block_codes(get(f"{name}.index"), get(f"{name}.values"))
            codes = torch.zeros(spec["k"], spec["d2"]).scatter_(0, support, values)
        else:
            codes = codes_dense(get(f"{name}.mask"), get(f"{name}.values14"), spec["k"],
                                spec["d2"])
        return (dictionary @ codes).T
    if spec["kind"] == "masa":
        weight = torch.zeros(spec["d2"], spec["d1"])
        if spec["atoms"]:
            atoms = get(f"{spec.get('atoms_from', name)}.atoms").float()
            weight += torch.tensordot(get(f"{name}.coefficients").float(), atoms, dims=1)
        if spec["r"]:
            weight += (get(f"{name}.left").float() @ get(f"{name}.right").float()).T
        return weight
    left_t = get(f"{spec.get('left_from', name)}.left").float()  # stored transposed
    return get(f"{name}.right").float() @ left_t


def _torch_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AssembleError(f"config dtype {name!r} is not a torch floating dtype")
    return dtype


def _compressed_section(config: dict, model_dir: Path) -> dict[str, dict]:
    section = config.get("cospadi")
    if not isinstance(section, dict) or section.get("format") != MODEL_FORMAT:
        raise AssembleError(f"{model_dir} is not a cospadi compressed checkpoint")
    if section.get("version") != MODEL_VERSION:
        raise AssembleError(f"{model_dir}: cospadi model version {section.get('version')} "
                            f"is not {MODEL_VERSION}")
    return section["modules"]


@_user_errors()
def export_dense(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_SHARD,
                 overwrite: bool = False) -> Path:
    """A plain checkpoint with ``W = D S`` (or ``L R``) that stock transformers loads.

    Weights are computed in float32 and stored in ``dtype`` (default: the config's dtype);
    uncompressed tensors are copied unchanged.
    """
    compressed_dir, out_dir = Path(compressed_dir), Path(out_dir)
    config = _read_config(compressed_dir)
    specs = _compressed_section(config, compressed_dir)
    dtype = dtype or _torch_dtype(config)
    tensors = checkpoint_tensors(compressed_dir)
    reader = TensorSource()
    try:
        out: list[OutTensor] = []
        compressed_keys = set()
        for name, spec in specs.items():
            keys = set(expected_tensors(name, spec))
            missing = sorted(keys - set(tensors))
            if missing:
                raise AssembleError(f"{compressed_dir} lacks compressed tensors {missing}")
            compressed_keys |= keys
            out.append(OutTensor(
                f"{name}.weight", spec["d1"] * spec["d2"] * dtype.itemsize,
                lambda n=name, s=spec: _dense_weight(n, s, tensors, reader).to(dtype)))
        for name, info in tensors.items():
            if name in compressed_keys:
                continue
            module = name.rpartition(".")[0]
            if module in specs:  # a compressed module's bias: match the weight's dtype
                out.append(OutTensor(name, info.numel * dtype.itemsize,
                                     lambda i=info, n=name: reader.get(i, n).to(dtype)))
            else:
                out.append(OutTensor(name, info.nbytes, lambda i=info, n=name: reader.get(i, n)))
        config = {key: value for key, value in config.items() if key != "cospadi"}
        auto_map = {k: v for k, v in config.pop("auto_map", {}).items() if AUTO_MAP.get(k) != v}
        if auto_map:
            config["auto_map"] = auto_map
        with staged_dir(out_dir, overwrite) as tmp:
            write_shards(tmp, out, parse_size(max_shard_size))
            write_json(tmp / "config.json", config)
            copy_side_files(compressed_dir, tmp, skip=(MODELING_FILE, KERNEL_FILE))
    finally:
        reader.close()
    return out_dir


def _layer_of(module: str) -> str:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return match.group(1) if match else "other"


def _figures(params: int, nbytes: int, dense_params: int) -> dict:
    dense_bytes = DENSE_BYTES_PER_PARAM * dense_params
    return {"params": params, "bytes": nbytes, "dense_params": dense_params,
            "dense_bytes": dense_bytes,
            "kept_params": params / dense_params if dense_params else 0.0,
            "kept_bytes": nbytes / dense_bytes if dense_bytes else 0.0}


def _add(total: dict, part: dict) -> None:
    for key in ("params", "bytes", "dense_params"):
        total[key] = total.get(key, 0) + part[key]


@_user_errors()
def inspect_model(model_dir: str | os.PathLike) -> dict:
    """Achieved sizes of a compressed checkpoint, from its headers (no tensor data read).

    ``modules``: per compressed projection, params (``d1 k + s d2`` or ``r (d1 + d2)``; a
    shared dictionary or left factor counts for its owner only) and bytes actually stored,
    against the dense ``d1 d2`` parameters at bf16. ``layers``: the same summed per decoder block.
    ``compressed``: all compressed projections. ``model``: the whole model, uncompressed
    tensors (embeddings, norms, biases, lm_head) counted at bf16 like the dense reference;
    ``stored_bytes`` is the actual size of all tensors in the shards.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    specs = _compressed_section(config, model_dir)
    tensors = checkpoint_tensors(model_dir)
    modules: dict[str, dict] = {}
    used: set[str] = set()
    for name in sorted(specs, key=natural_key):
        spec = specs[name]
        keys = expected_tensors(name, spec)
        missing = sorted(set(keys) - set(tensors))
        if missing:
            raise AssembleError(f"{model_dir} lacks compressed tensors {missing}")
        used |= set(keys)
        if spec["kind"] == "dictionary":
            params = spec["s"] * spec["d2"]
            if "dictionary_from" not in spec:
                params += spec["d1"] * spec["k"]
        elif spec["kind"] == "masa":  # shared atoms count for their owner only
            params = spec["atoms"] + spec["r"] * (spec["d1"] + spec["d2"])
            if "atoms_from" not in spec:
                params += spec["atoms"] * spec["d1"] * spec["d2"]
        else:
            params = spec["r"] * spec["d2"]
            if "left_from" not in spec:
                params += spec["r"] * spec["d1"]
        nbytes = sum(tensors[key].nbytes for key in keys)
        shape = {key: spec[key] for key in ("d1", "d2", "k", "s", "r", "atoms") if key in spec}
        modules[name] = dict(kind=spec["kind"], **shape,
                             shared_dictionary="dictionary_from" in spec
                             or "atoms_from" in spec,
                             shared_left="left_from" in spec,
                             **_figures(params, nbytes, spec["d1"] * spec["d2"]))
        if "diagnostics" in spec:  # the solver's achieved and SVD-LLM's whitened errors
            modules[name]["diagnostics"] = spec["diagnostics"]
    allocation = config["cospadi"].get("allocation", {})
    for name, record in allocation.items():
        if record.get("method") == "dense" and name not in modules:
            weight = tensors.get(f"{name}.weight")
            if weight is None:
                raise AssembleError(f"{model_dir} lacks the dense weight {name}.weight")
            used.add(f"{name}.weight")
            d1, d2 = weight.shape[1], weight.shape[0]
            modules[name] = dict(kind="dense", d1=d1, d2=d2, shared_dictionary=False,
                                 **_figures(d1 * d2, DENSE_BYTES_PER_PARAM * d1 * d2, d1 * d2))
    layers: dict[str, dict] = {}
    compressed: dict = {}
    for name, figures in sorted(modules.items(), key=lambda kv: natural_key(kv[0])):
        _add(layers.setdefault(_layer_of(name), {}), figures)
        _add(compressed, figures)
    other = sum(info.numel for key, info in tensors.items() if key not in used)
    model = {"params": compressed.get("params", 0) + other,
             "bytes": compressed.get("bytes", 0) + DENSE_BYTES_PER_PARAM * other,
             "dense_params": compressed.get("dense_params", 0) + other}
    report_allocation = {name: {key: record[key] for key in
                                ("method", "k", "s", "r", "bytes", "predicted", "achieved")
                                if key in record}
                         for name, record in allocation.items()}
    return {
        "modules": modules,
        **({"allocation": report_allocation} if report_allocation else {}),
        "layers": {key: _figures(v["params"], v["bytes"], v["dense_params"])
                   for key, v in sorted(layers.items(), key=lambda kv: natural_key(kv[0]))},
        "compressed": _figures(compressed.get("params", 0), compressed.get("bytes", 0),
                               compressed.get("dense_params", 0)),
        "model": dict(_figures(model["params"], model["bytes"], model["dense_params"]),
                      stored_bytes=sum(info.nbytes for info in tensors.values())),
    }
