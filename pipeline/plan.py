"""The ``--dry-run`` plan: per-matrix sizes and the disk and memory a run will need.

Everything is computed from the config and the checkpoint headers; nothing is loaded.
Memory figures are estimates (stated as such): the dominant buffers of each task, not an
allocator trace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..stages.build_block import ModelSkeleton
from ..stages.compress_block import plan_groups, solve_units
from ..stages.masa import MasaError, group_atoms, masa_shape, masa_units
from ..stages.projections import INPUTS, PROJECTIONS
from ..stages.sizing import (
    DENSE_BYTES_PER_PARAM,
    dictionary_bytes,
    dictionary_shape,
    svd_rank,
)
from ..storage.hf_checkpoint import parse_size
from ..storage.shards import ShardReader
from .config import CompressConfig, ConfigError

INTERPRETER_BYTES = 600 << 20  # python + torch + transformers imported (measured ~0.5 GB)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MatrixPlan:
    projection: str
    members: int  # layers sharing one solve
    d1: int
    d2: int  # per member
    k: int | None
    s: int | None
    r: int | None
    bytes: int  # stored bytes of one solve (all members)
    params: int
    count: int = 0  # solves of this kind in the model
    atoms: int | None = None  # MASA: matrix atoms S shared by the members (r: their total)

    @property
    def dense_params(self) -> int:
        return self.d1 * self.d2 * self.members


@dataclass
class Plan:
    matrices: list[MatrixPlan]
    num_layers: int
    groups: int
    disk: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    device_bytes: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    hidden: int = 0
    input_dims: dict[str, int] = field(default_factory=dict)  # unique input -> its width

    @property
    def kept_params(self) -> float:
        return sum(m.params * m.count for m in self.matrices) / \
            sum(m.dense_params * m.count for m in self.matrices)

    @property
    def kept_bytes(self) -> float:
        return sum(m.bytes * m.count for m in self.matrices) / \
            sum(DENSE_BYTES_PER_PARAM * m.dense_params * m.count for m in self.matrices)


def matrix_plan(cfg: CompressConfig, projection: str, members: int, d1: int,
                d2: int) -> MatrixPlan:
    total_d2 = d2 * members
    if cfg.method == "masa":
        try:
            # auto: planned as S = 0; every S it may pick fills the same budget (one rank unit)
            atoms = 0 if cfg.masa_atoms == "auto" else group_atoms(members, cfg.masa_atoms)
            shape = masa_shape(d1, d2, members, cfg.ratio, atoms)
        except MasaError as err:
            raise ConfigError(f"{projection}: {err}") from err
        return MatrixPlan(projection, members, d1, d2, None, None, shape.rank, shape.bytes,
                          shape.params, atoms=shape.atoms)
    if cfg.method == "svd-llm":
        shape = svd_rank(d1, total_d2, cfg.ratio)
        return MatrixPlan(projection, members, d1, d2, None, None, shape.r, shape.bytes,
                          shape.params)
    shape = dictionary_shape(d1, total_d2, cfg.ratio, cfg.rho, cfg.support)
    return MatrixPlan(projection, members, d1, d2, shape.k, shape.s, None,
                      dictionary_bytes(d1, total_d2, shape.k, shape.s, cfg.support),
                      shape.params)


def make_plan(cfg: CompressConfig, skeleton: ModelSkeleton, reader: ShardReader,
              depth: int | None = None) -> Plan:
    """``depth``: blocks to compress when fewer than the model's (after pruning)."""
    config = skeleton.config
    layers = skeleton.num_layers if depth is None else depth
    groups = plan_groups(layers, cfg.group_size)
    shapes = {proj: skeleton.projection_shape(proj) for proj in PROJECTIONS}
    counts: Counter[tuple[str, int]] = Counter()
    targets = cfg.target_projections
    for members in groups:
        units = masa_units(members, targets) if cfg.method == "masa" else \
            solve_units(members, targets)
        for projection, unit in units:
            counts[(projection, len(unit))] += 1
    matrices = []
    for (projection, members), count in counts.items():
        matrix = matrix_plan(cfg, projection, members, *shapes[projection])
        matrix.count = count
        matrices.append(matrix)
    matrices.sort(key=lambda m: (PROJECTIONS.index(m.projection), -m.members))

    dtype = cfg.resolved_dtype()
    act_bytes = _DTYPE_BYTES[dtype]
    hidden, inter = config.hidden_size, config.intermediate_size
    input_dims = {name: shapes[projs[0]][0] for name, projs in INPUTS.items()}
    gram_block = sum(8 * d * d for d in input_dims.values())
    act_store = cfg.calib_samples * cfg.seq_len * hidden * act_bytes
    factor_bytes = sum(m.bytes * m.count for m in matrices)
    # a group's shared dictionary (or low-rank left factor, or MASA's atoms) is stored in
    # every member's factor file; the output model holds it once
    per_file_dict = sum(2 * m.d1 * (m.k or m.r or 0) * (m.members - 1) * m.count
                        for m in matrices)
    if cfg.method == "masa":
        # auto may pick up to m - 1 atoms: the disk estimate takes the largest
        per_file_dict = sum(2 * m.d1 * m.d2 * (m.members - 1 if cfg.masa_atoms == "auto"
                                               else m.atoms or 0) * (m.members - 1) * m.count
                            for m in matrices)
    projection_keys = {f"{skeleton.layer_path(i)}.{p}.weight"
                       for i in range(layers) for p in PROJECTIONS}
    other_bytes = _other_tensor_bytes(reader, projection_keys)
    alive_blocks = layers if cfg.keep_work else \
        min(layers, (cfg.max_inflight + 1) * cfg.group_size)
    alive_acts = layers + 1 if cfg.keep_work else \
        (cfg.group_size + 2 if cfg.propagate == "compressed" else 2)
    disk = {"grams": gram_block * alive_blocks, "activations": act_store * alive_acts,
            "factors": factor_bytes + per_file_dict, "output": factor_bytes + other_bytes}

    # dominant buffers of the two heavy tasks (estimate)
    block_params = sum(d1 * d2 for d1, d2 in shapes.values())
    heads = config.num_attention_heads
    forward = cfg.micro_batch * cfg.seq_len * (6 * hidden + 3 * inter) * 4 + \
        cfg.micro_batch * heads * cfg.seq_len * cfg.seq_len * 4
    capture = block_params * act_bytes + gram_block + forward
    # factor task: whitening holds G, R and (on the fallback paths) one more d1 x d1;
    # the solve holds R and ~4 float64 copies of the (stacked) weight
    widest_input = max(m.d1 for m in matrices)
    whiten = 3 * 8 * widest_input * widest_input
    solve = max(whiten, max(8 * (m.d1 * m.d1 + 4 * m.d1 * m.d2 * m.members) for m in matrices))
    embed = config.vocab_size * hidden * act_bytes
    assemble = parse_size(cfg.shard_size)  # one output shard in memory
    task = max(capture, solve, embed + forward, assemble)
    device = cfg.resolved_device()
    parallel = 1 if device.startswith("cuda") else cfg.workers
    if device.startswith("cuda"):
        host = INTERPRETER_BYTES + block_params * 2 + 2 * cfg.micro_batch * cfg.seq_len * hidden * 4
        device_bytes = task
    else:
        host = INTERPRETER_BYTES + parallel * task
        device_bytes = 0
    return Plan(matrices, layers, len(groups), disk, host, device_bytes, device, dtype,
                hidden, input_dims)


def _other_tensor_bytes(reader: ShardReader, skip: set[str]) -> int:
    total = 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1,
             "BOOL": 1}
    for shard in reader.shard_names:
        for name, (dtype, shape) in reader.header(shard).items():
            if name in skip:
                continue
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * sizes.get(dtype, 4)
    return total


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def format_plan(cfg: CompressConfig, plan: Plan, seconds: dict[str, float] | None = None
                ) -> str:
    lines = [f"plan: {cfg.method} at ratio {cfg.ratio} on {plan.num_layers} blocks "
             f"({plan.groups} groups of <= {cfg.group_size}), {cfg.calib_samples} x "
             f"{cfg.seq_len} calibration tokens, {plan.dtype} on {plan.device}",
             f"{'matrix':<18}{'layers':>7}{'d1 x d2':>14}{'k':>7}{'s':>7}{'r':>7}"
             f"{'kept bytes':>13}{'x solves':>9}"]
    if cfg.method == "masa":
        lines[-1] = lines[-1].replace(f"{'k':>7}{'s':>7}{'r':>7}",
                                      f"{'S':>7}{'r sum':>8}{'r each':>10}")
    for m in plan.matrices:
        if m.atoms is not None:  # MASA: S atoms, the group's total correction rank
            ranks = f"{m.r // m.members}-{-(-m.r // m.members)}" \
                if m.r % m.members else f"{m.r // m.members}"
            lines.append(f"{m.projection:<18}{m.members:>7}{f'{m.d1} x {m.d2}':>14}"
                         f"{m.atoms if cfg.masa_atoms != 'auto' else 'auto':>7}{m.r:>8}"
                         f"{'~' + ranks:>10}{human(m.bytes):>13}"
                         f"{m.count:>9}")
            continue
        lines.append(f"{m.projection:<18}{m.members:>7}{f'{m.d1} x {m.d2}':>14}"
                     f"{m.k if m.k is not None else '-':>7}{m.s if m.s is not None else '-':>7}"
                     f"{m.r if m.r is not None else '-':>7}{human(m.bytes):>13}{m.count:>9}")
    lines.append(f"kept fraction of projection params {plan.kept_params:.3f}, of bf16 bytes "
                 f"{plan.kept_bytes:.3f}")
    if cfg.target_projections != PROJECTIONS:
        lines[-1] += f" (targets {', '.join(cfg.targets)}; the others stay dense)"
    if cfg.method == "masa":
        lines.append("masa: r sum is the group's correction rank, spread over its members by "
                     "calibration (r each: the even split)")
        if cfg.masa_atoms == "auto":
            lines.append("masa: S auto: per group and projection the S in 0 .. m - 1 of least "
                         "functional error, r sum shown for S = 0 (any S meets the same bytes)")
    disk = plan.disk
    lines.append("work dir disk (peak): grams " + human(disk["grams"]) + ", activations "
                 + human(disk["activations"]) + ", factors " + human(disk["factors"])
                 + f"; output {human(disk['output'])}")
    memory = f"expected peak memory (estimate): host {human(plan.host_bytes)}"
    if plan.device_bytes:
        memory += f", device {human(plan.device_bytes)}"
    lines.append(memory)
    if seconds is not None:
        from .timing import format_seconds

        lines.append(f"expected time (estimate from FLOP counts and rates measured here): "
                     f"{format_seconds(sum(seconds.values()))} = "
                     + ", ".join(f"{stage} {format_seconds(value)}"
                                 for stage, value in seconds.items()))
    return "\n".join(lines)


def plan_json(cfg: CompressConfig, plan: Plan) -> dict:
    return {
        "matrices": [{"projection": m.projection, "layers_per_solve": m.members, "d1": m.d1,
                      "d2": m.d2, "k": m.k, "s": m.s, "r": m.r, "atoms": m.atoms,
                      "bytes": m.bytes,
                      "params": m.params, "solves": m.count} for m in plan.matrices],
        "kept_params": plan.kept_params, "kept_bytes": plan.kept_bytes,
        "disk": plan.disk, "host_bytes": plan.host_bytes, "device_bytes": plan.device_bytes,
    }
