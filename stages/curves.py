"""Error curves of one solve unit: its options, their bytes and predicted errors.

A unit is a whitened matrix ``W_L = R W`` (d1 x d2; a group's members concatenated along
d2). Its options, in the on-disk format:

- ``lowrank`` at every rank r whose bytes stay below the dense matrix: the error of the
  truncated SVD is exact and free for every r at once, ``sum_{j > r} sigma_j^2``;
- ``dictionary`` at a ladder of kept fractions for several rho = k / s, with ``k <= d1``:
  the error of the closed-form warm start (orthonormal D = top-k left singular vectors of
  ``W_L``, codes = the s largest entries of ``D^T W_L`` per column). With D orthonormal the
  error is ``||W_L||^2`` minus the kept squared codes, so every (k, s) costs one top-s over
  the first k rows of ``Sigma V^T``; solvers that refine from this start only do better,
  so the prediction is an upper bound for them;
- ``dense``: the matrix kept as is (bf16 bytes, no error).

Errors are relative: ``||R (W - W_hat)||_F^2 / ||R W||_F^2``, the normalised functional
error. The model-level proxy weighs each unit's relative error (:func:`proxy_weight`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .sizing import DENSE_BYTES_PER_PARAM, LowRankShape, dictionary_bytes, dictionary_shape

DEFAULT_RHOS = (1.5, 2.0, 3.0, 4.0)
DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # kept bytes 0.05..0.95
WEIGHTS = ("params", "matrices", "energy", "loss")


@dataclass(frozen=True)
class Option:
    method: str  # "dictionary" | "lowrank" | "dense"
    bytes: int
    error: float  # predicted relative squared functional error
    k: int | None = None
    s: int | None = None
    r: int | None = None

    def label(self) -> str:
        if self.method == "dictionary":
            return f"dict k={self.k} s={self.s}"
        if self.method == "lowrank":
            return f"lowrank r={self.r}"
        return "dense"

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @staticmethod
    def from_dict(data: dict) -> Option:
        return Option(method=data["method"], bytes=int(data["bytes"]),
                      error=float(data["error"]), k=data.get("k"), s=data.get("s"),
                      r=data.get("r"))


@dataclass
class UnitCurve:
    projection: str
    layers: tuple[int, ...]
    d1: int
    d2: int  # all members together
    energy: float  # ||R W||_F^2 (per calibration token: Grams are token means)
    options: list[Option]

    @property
    def key(self) -> str:
        return unit_key(self.projection, self.layers)

    def as_dict(self) -> dict:
        return {"projection": self.projection, "layers": list(self.layers), "d1": self.d1,
                "d2": self.d2, "energy": self.energy,
                "options": [o.as_dict() for o in self.options]}

    @staticmethod
    def from_dict(data: dict) -> UnitCurve:
        return UnitCurve(data["projection"], tuple(data["layers"]), int(data["d1"]),
                         int(data["d2"]), float(data["energy"]),
                         [Option.from_dict(o) for o in data["options"]])


def unit_key(projection: str, layers: tuple[int, ...] | list[int]) -> str:
    return f"{projection}@{'-'.join(str(layer) for layer in layers)}"


def dense_option(d1: int, d2: int) -> Option:
    return Option("dense", DENSE_BYTES_PER_PARAM * d1 * d2, 0.0)


def svd_options(sigma: torch.Tensor, d1: int, d2: int) -> list[Option]:
    """Every rank below the dense size, with its exact relative error."""
    power = sigma.to(torch.float64).square()
    total = float(power.sum())
    # tail[r] = sum_{j >= r} sigma_j^2, r = 0..n
    tail = torch.flip(torch.cumsum(torch.flip(power, [0]), 0), [0]).tolist() + [0.0]
    dense = DENSE_BYTES_PER_PARAM * d1 * d2
    options = []
    for r in range(1, min(d1, d2) + 1):
        shape = LowRankShape(d1=d1, d2=d2, r=r)
        if shape.bytes >= dense:
            break
        options.append(Option("lowrank", shape.bytes, tail[r] / total if total else 0.0, r=r))
    return options


def dictionary_ladder(d1: int, d2: int, rhos: tuple[float, ...] = DEFAULT_RHOS,
                      fractions: tuple[float, ...] = DEFAULT_FRACTIONS
                      ) -> dict[int, list[int]]:
    """``{k: [s, ...]}``: k from the kept ``fractions`` at rho = 2 (k <= d1, an
    orthonormal dictionary), s = k / rho for every rho, below the dense size."""
    dense = DENSE_BYTES_PER_PARAM * d1 * d2
    ladder: dict[int, set[int]] = {}
    for kept in fractions:
        k = dictionary_shape(d1, d2, 1.0 - kept, 2.0).k
        if k > d1:
            continue
        for rho in rhos:
            s = int(min(max(round(k / rho), 1), k))
            if dictionary_bytes(d1, d2, k, s) < dense:
                ladder.setdefault(k, set()).add(s)
    return {k: sorted(ss) for k, ss in sorted(ladder.items())}


def threshold_errors(codes: torch.Tensor, total: float, ladder: dict[int, list[int]]
                     ) -> dict[tuple[int, int], float]:
    """Relative error of the orthonormal warm start at each (k, s) of ``ladder``.

    ``codes`` = ``Sigma V^T`` (rank x d2, rows by decreasing singular value), ``total`` =
    ``||W_L||^2``. Atoms beyond the rank add nothing (their codes are zero). One sorted
    top-(max s) per k serves every s of that k (cumulative sums of the kept energy); the
    codes are transposed so each column's entries are contiguous for the selection.
    """
    power = codes.to(torch.float64).square().T.contiguous()  # d2 x rank
    errors = {}
    for k, ss in ladder.items():
        rows = power[:, :min(k, power.shape[1])]
        top = torch.topk(rows, min(max(ss), rows.shape[1]), dim=1, sorted=True).values
        kept = torch.cumsum(top.sum(dim=0), 0)
        for s in ss:
            energy = float(kept[min(s, kept.shape[0]) - 1])
            errors[(k, s)] = max(0.0, total - energy) / total if total else 0.0
    return errors


def spectrum(whitened: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and codes ``U^T W_L = Sigma V^T`` (rank x d2).

    From the eigen-decomposition of the smaller Gram of ``W_L`` (3-4x faster than its SVD
    here); squaring loses relative accuracy only on singular values below ~1e-8 of the
    largest, whose energy is far below any error the curves resolve.
    """
    d1, d2 = whitened.shape
    if d1 <= d2:
        values, vectors = torch.linalg.eigh(whitened @ whitened.T)
        values, vectors = values.flip(0), vectors.flip(1)
        return values.clamp_min(0.0).sqrt(), vectors.T @ whitened
    values, vectors = torch.linalg.eigh(whitened.T @ whitened)
    values, vectors = values.flip(0), vectors.flip(1)
    sigma = values.clamp_min(0.0).sqrt()
    return sigma, sigma[:, None] * vectors.T


def unit_curve(projection: str, layers: tuple[int, ...], whitened: torch.Tensor,
               rhos: tuple[float, ...] = DEFAULT_RHOS,
               fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
               with_dictionary: bool = True,
               extra: tuple[tuple[int, int], ...] = (),
               spectral: tuple[torch.Tensor, torch.Tensor] | None = None) -> UnitCurve:
    """All options of one unit from its whitened matrix ``W_L`` (d1 x d2); ``extra``:
    more dictionary (k, s) to include (the uniform plan's); ``spectral``: its
    :func:`spectrum`, if already computed."""
    whitened = whitened.to(torch.float64)
    d1, d2 = whitened.shape
    sigma, codes = spectral if spectral is not None else spectrum(whitened)
    total = float(whitened.square().sum())
    options = svd_options(sigma, d1, d2)
    if with_dictionary:
        ladder = dictionary_ladder(d1, d2, rhos, fractions)
        for k, s in extra:
            ladder[k] = sorted(set(ladder.get(k, [])) | {s})
        errors = threshold_errors(codes, total, ladder)
        for (k, s), error in sorted(errors.items()):
            options.append(Option("dictionary", dictionary_bytes(d1, d2, k, s), error,
                                  k=k, s=s))
    options.append(dense_option(d1, d2))
    return UnitCurve(projection, tuple(layers), d1, d2, total, options)


def calibrated(curve: UnitCurve, k: int, s: int, achieved: float) -> UnitCurve:
    """The curve with every dictionary error scaled by ``achieved / predicted`` at (k, s).

    The warm start's error overstates what a refining solver reaches (on SmolLM2-sized
    matrices the closed-form solver ends well below it), which would bias the allocation
    towards low-rank and dense options. One short solve per unit at (k, s) measures the
    gain; the same relative gain is assumed at the unit's other (k, s) (a model, checked
    by the achieved errors the factor tasks record).
    """
    base = next(o for o in curve.options if o.method == "dictionary" and (o.k, o.s) == (k, s))
    scale = min(1.0, achieved / base.error) if base.error > 0 else 1.0
    options = [Option(o.method, o.bytes, o.error * scale, o.k, o.s, o.r)
               if o.method == "dictionary" else o for o in curve.options]
    return UnitCurve(curve.projection, curve.layers, curve.d1, curve.d2, curve.energy, options)


def proxy_weight(curve: UnitCurve, weighting: str,
                 sensitivity: dict[str, float] | None = None) -> float:
    """How much one unit's relative error counts in the model-level proxy.

    ``params``: by the unit's dense parameters (every weight of the model counts alike);
    ``matrices``: one per member matrix; ``energy``: by ``||R W||^2`` (the absolute
    functional error, summed over the model); ``loss``: the absolute error times the
    loss sensitivity of the unit's output, ``a = E||dL/dy||^2 / d_out`` per member
    (``sensitivity``, keyed ``projection@layer``; a group's members are averaged), the
    Fisher estimate of the loss increase the error causes.
    """
    if weighting == "params":
        return float(curve.d1 * curve.d2)
    if weighting == "matrices":
        return float(len(curve.layers))
    if weighting == "energy":
        return curve.energy
    if weighting == "loss":
        keys = [unit_key(curve.projection, (layer,)) for layer in curve.layers]
        missing = [key for key in keys if key not in (sensitivity or {})]
        if missing:
            raise ValueError(f"allocation-weight loss: no sensitivity for {', '.join(missing)}")
        return curve.energy * sum(sensitivity[key] for key in keys) / len(keys)
    raise ValueError(f"proxy weighting must be one of {', '.join(WEIGHTS)}, got {weighting!r}")
