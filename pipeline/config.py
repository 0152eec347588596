"""The one typed settings object of ``cospadi compress``, validated at the edge.

Sources, later winning: dataclass defaults < YAML file (``--config``) < command-line flags.
YAML keys may use dashes or underscores (``group-size`` = ``group_size``); an unknown key or
a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid (the message names it)."""


@dataclass(frozen=True)
class CompressConfig:
    model: str | None = None  # local directory or hub id
    out: str | None = None
    method: str = "cospadi"  # cospadi | svd-llm | masa | none (with prune-blocks: prune only)
    ratio: float = 0.3  # compression ratio gamma: fraction of parameters removed
    rho: float = 2.0  # atoms per non-zero, k / s
    solver: str = "closed"  # dictionary solver: closed (default, fast) | ksvd (the paper's)
    iters: int | None = None  # solver iterations (None: 15 for closed, 60 for ksvd)
    refine_iters: int = 20  # closed: least-squares rounds on the fixed support, at most
    power_iters: int = 8  # ksvd: power iterations per atom update
    omp_atoms_per_step: int = 1  # ksvd: 1 exact OMP; b > 1 gOMP (about b x faster, worse codes)
    omp_memory: str | None = None  # ksvd: OMP working memory, e.g. 4GB (None: from free memory)
    seed: int = 42
    group_size: int = 1  # consecutive blocks sharing q, k, v, gate, up dictionaries
    # projections compressed by every method (short names: q_proj, ...); others stay dense
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    # MASA: matrix atoms S shared by a group (S < group size), or auto: per group and
    # projection the S in 0 .. m - 1 of least functional error at the same bytes
    masa_atoms: int | str = "auto"
    support: str = "free"  # code support structure: free | 2:4 | block<B> (stages/supports.py)
    calib_text: str | None = None
    calib_data: str | None = None  # datasets: local data file(s) / folder / hub id[:config]
    calib_split: str = "train"
    calib_column: str | None = None  # default: text, else messages (chat template)
    calib_packing: str = "pack"  # pack | truncate (--calib-data rows into windows)
    bos: str = "auto"  # auto | always | never: BOS at the start of every window
    calib_samples: int = 256
    seq_len: int = 1024
    micro_batch: int = 8  # samples per block forward
    propagate: str = "original"  # original | compressed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # block compute dtype: auto | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto (as from_pretrained picks) | sdpa | eager
    work_dir: str | None = None  # default: <out>.work
    scheduler: str | None = None  # None / "threads" / "sync": local; else dask address
    workers: int = 1  # local scheduler threads (2+ overlaps I/O with compute, costs memory)
    max_inflight: int = 2  # blocks captured ahead of factorisation (bounds memory and disk)
    keep_work: bool = False  # keep Grams and activations after use
    shard_size: str = "256MB"  # output shards; assembly holds one shard in memory at a time
    torch_threads: int | None = None  # intra-op threads per process (None: torch default)
    prune_blocks: int = 0  # ReplaceMe: remove this many consecutive blocks first (0: off)
    prune_fit: str = "lstsq"  # lstsq / cosine: fold a fitted map into the block before; drop
    allocation: str = "uniform"  # uniform: every matrix at --ratio; global: one budget, spent
    # per matrix where it lowers the proxy most (method, k, s or rank chosen per matrix);
    # block: the same within each block (group), every block keeping its uniform bytes
    allocation_weight: str = "params"  # proxy: relative functional errors weighted by
    # params (dense size) | matrices (one each) | energy (||R W||^2) | loss (||R (W - W_hat)||^2
    # x the loss sensitivity of the output, measured by the streamed sensitivity tasks)
    allocation_band: float = 0.0  # > 0: each matrix's bytes within (1 -/+ band) x uniform
    sensitivity_samples: int | None = None  # weight loss: windows backpropagated (None: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", canonical_targets(self.targets))
        validate(self)

    @property
    def target_projections(self) -> tuple[str, ...]:
        """The targeted projections as module paths inside a block, in block order."""
        from ..stages.projections import projection_path

        return tuple(projection_path(name) for name in self.targets)

    @property
    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        if not self.out:
            raise ConfigError("--out is required")
        out = Path(self.out)
        return out.parent / f"{out.name}.work"

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> str:
        if self.dtype == "auto":
            return "float32" if self.resolved_device() == "cpu" else "bfloat16"
        return self.dtype

    def local_scheduler(self) -> str | None:
        """"threads" or "sync" when running in-process, None for a dask.distributed address."""
        if self.scheduler in (None, "threads", "local"):
            return "threads"
        if self.scheduler in ("sync", "synchronous"):
            return "sync"
        return None

    def fingerprint_settings(self) -> dict[str, Any]:
        """Settings that change the outputs (resuming with other values would mix runs)."""
        keep = ("method", "ratio", "rho", "solver", "iters", "refine_iters", "power_iters",
                "omp_atoms_per_step", "seed", "group_size", "support",
                "calib_samples", "seq_len", "micro_batch", "propagate",
                "attn_implementation", "shard_size")
        settings = {key: getattr(self, key) for key in keep}
        if self.prune_blocks:  # absent when off: earlier work directories still resume
            settings.update(prune_blocks=self.prune_blocks, prune_fit=self.prune_fit)
        settings["dtype"] = self.resolved_dtype()
        # only when not the default, so work directories of earlier runs still resume
        if self.targets != ALL_TARGETS:
            settings["targets"] = list(self.targets)
        if self.method == "masa":
            settings["masa_atoms"] = self.masa_atoms
        if self.allocation != "uniform":  # absent when uniform: older work dirs still resume
            settings["allocation"] = self.allocation
            settings["allocation_weight"] = self.allocation_weight
            if self.allocation_band:
                settings["allocation_band"] = self.allocation_band
            if self.sensitivity_samples:
                settings["sensitivity_samples"] = self.sensitivity_samples
        return settings


ALL_TARGETS: tuple[str, ...] = CompressConfig.targets


def canonical_targets(targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Short projection names in block order; accepts ``q_proj``, ``q`` or
    ``self_attn.q_proj``, a list or a comma-separated string; an unknown name is an error."""
    if isinstance(targets, str):
        targets = targets.split(",")
    names = []
    for raw in targets:
        if not str(raw).strip():
            continue
        name = str(raw).strip().rpartition(".")[2]
        if name and not name.endswith("_proj"):
            name += "_proj"
        if name not in ALL_TARGETS:
            raise ConfigError(f"targets: unknown projection {str(raw).strip()!r} (choose from "
                              f"{', '.join(ALL_TARGETS)})")
        names.append(name)
    if not names:
        raise ConfigError("targets must name at least one projection")
    return tuple(name for name in ALL_TARGETS if name in names)


CHOICES = {
    "method": ("cospadi", "svd-llm", "masa", "none"),
    "solver": ("closed", "ksvd"),
    "propagate": ("original", "compressed"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "attn_implementation": ("auto", "sdpa", "eager"),
    "calib_packing": ("pack", "truncate"),
    "bos": ("auto", "always", "never"),
    "prune_fit": ("lstsq", "cosine", "drop"),
    "allocation": ("uniform", "global", "block"),
    "allocation_weight": ("params", "matrices", "energy", "loss"),
}


def validate(cfg: CompressConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, "
                              f"got {getattr(cfg, key)!r}")
    if not (0.0 < cfg.ratio < 1.0):
        raise ConfigError(f"ratio must lie in (0, 1), got {cfg.ratio}")
    if not cfg.rho >= 1.0:
        raise ConfigError(f"rho must be >= 1, got {cfg.rho}")
    for key in ("iters", "power_iters", "omp_atoms_per_step", "group_size", "calib_samples",
                "seq_len",
                "micro_batch", "workers", "max_inflight"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.method == "masa":
        if cfg.group_size < 2:
            raise ConfigError("method masa shares atoms across a group: group-size must be "
                              f">= 2, got {cfg.group_size}")
        if isinstance(cfg.masa_atoms, str):
            if cfg.masa_atoms != "auto":
                raise ConfigError(f"masa-atoms must be auto or an integer S, got "
                                  f"{cfg.masa_atoms!r}")
        elif not 1 <= cfg.masa_atoms < cfg.group_size:
            raise ConfigError(f"masa-atoms S must satisfy 1 <= S < group-size "
                              f"({cfg.group_size}), got {cfg.masa_atoms}")
    if cfg.refine_iters < 0:
        raise ConfigError(f"refine-iters must be >= 0, got {cfg.refine_iters}")
    if cfg.calib_text and cfg.calib_data:
        raise ConfigError("give calib-text or calib-data, not both")
    if cfg.prune_blocks < 0:
        raise ConfigError(f"prune-blocks must be >= 0, got {cfg.prune_blocks}")
    if cfg.method == "none" and cfg.prune_blocks < 1:
        raise ConfigError("method none (prune only) needs prune-blocks >= 1, got "
                          f"{cfg.prune_blocks}")
    if cfg.sensitivity_samples is not None and not \
            1 <= cfg.sensitivity_samples <= cfg.calib_samples:
        raise ConfigError(f"sensitivity-samples must lie in [1, calib-samples "
                          f"({cfg.calib_samples})], got {cfg.sensitivity_samples}")
    if not 0.0 <= cfg.allocation_band < 1.0:
        raise ConfigError(f"allocation-band must lie in [0, 1), got {cfg.allocation_band}")
    if cfg.allocation != "uniform" and cfg.propagate == "compressed":
        raise ConfigError("allocation global needs every block's Grams before the first "
                          "factorisation; it cannot be combined with propagate compressed")
    if cfg.allocation != "uniform" and (cfg.method not in ("cospadi", "svd-llm")
                                        or cfg.prune_blocks):
        raise ConfigError(f"allocation {cfg.allocation} spends budgets of cospadi or svd-llm "
                          "factors; it cannot be combined with method "
                          f"{cfg.method} or prune-blocks")
    from ..stages.supports import parse_support

    try:
        parse_support(cfg.support)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.support == "2:4" and cfg.rho != 2.0:
        raise ConfigError(f"support 2:4 keeps half the atoms per group: rho must be 2, "
                          f"got {cfg.rho}")
    if cfg.torch_threads is not None and cfg.torch_threads < 1:
        raise ConfigError(f"torch-threads must be >= 1, got {cfg.torch_threads}")
    from ..storage.hf_checkpoint import parse_size

    try:
        parse_size(cfg.shard_size)
    except ValueError as err:
        raise ConfigError(f"shard-size: {err}") from err
    if cfg.omp_memory is not None:
        try:
            parse_size(cfg.omp_memory)
        except ValueError as err:
            raise ConfigError(f"omp-memory: {err}") from err
    device = cfg.device
    if not (device in ("auto", "cpu", "cuda") or
            (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(CompressConfig)


def _accepts(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits type ``hint``; returns the (possibly widened) value."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for option in typing.get_args(hint):
            ok, converted = _accepts(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a list or "a,b,c"
        if isinstance(value, str):
            return True, tuple(part.strip() for part in value.split(","))
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else value
    return False, value


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of names"
    return "null" if hint is type(None) else hint.__name__


def normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check keys and types of raw settings; keys may use dashes."""
    hints = _field_types()
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {raw_key!r}{hint}")
        ok, converted = _accepts(value, hints[key])
        if not ok:
            raise ConfigError(f"{source}: setting {raw_key!r} must be {_type_name(hints[key])}, "
                              f"got {type(value).__name__} {value!r}")
        out[key] = converted
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{str(err).splitlines()[0]}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, "
                          f"got {type(data).__name__}")
    return normalise(data, f"config file {path}")


def make_config(yaml_path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> CompressConfig:
    """Defaults, then the YAML file, then ``overrides`` (the flags actually given)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(normalise(overrides or {}, "command line"))
    try:
        return CompressConfig(**values)
    except TypeError as err:  # defensive: normalise already rejects unknown keys
        raise ConfigError(str(err)) from err


def setting_names() -> list[str]:
    return [f.name for f in fields(CompressConfig)]


def as_dict(cfg: CompressConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
