"""On-disk form of the column-sparse codes S (k x d2, s non-zeros per column).

Two flat uint8 tensors, whose byte counts are exactly those of ``sizing.dictionary_bytes``:

``mask``: ceil(k d2 / 8) bytes. The k x d2 support bit-mask flattened column-major, i.e. bit
number ``b = j * k + i`` is set when atom i is used by output column j. Bits fill each byte
least-significant first (numpy ``packbits(bitorder="little")``): bit b is
``(mask[b // 8] >> (b % 8)) & 1``. Unused tail bits are zero.

``values14``: ceil(14 s d2 / 8) bytes. The non-zero coefficients in the order their set bits
appear in the mask (column by column, atoms ascending: ``values[:, j]`` for ascending
support), each as a 14-bit code: the top 14 bits of the bf16 bit pattern (sign, 8 exponent
bits, 5 mantissa bits), rounded to nearest even straight from float32 (one rounding, no
double rounding through bf16). Codes form a little-endian bit stream: code n occupies bits
[14 n, 14 n + 14), so each 4 codes make 7 bytes; the stream is zero-padded to a whole byte.
A code c decodes to the bf16 whose bits are ``c << 2``.
"""

from __future__ import annotations

import math

import torch

CODE_BITS = 14
_DROP = 32 - CODE_BITS  # float32 bits below a 14-bit code
_GROUP_CODES = 4  # 4 codes x 14 bits = 56 bits = 7 bytes
_GROUP_BYTES = 7
_CHUNK_GROUPS = 1 << 20  # bounds the int64 temporaries to ~60 MB whatever the matrix size


def mask_nbytes(k: int, d2: int) -> int:
    return math.ceil(k * d2 / 8)


def values_nbytes(s: int, d2: int) -> int:
    return math.ceil(s * d2 * CODE_BITS / 8)


def round_to_code(values: torch.Tensor) -> torch.Tensor:
    """14-bit codes (int64 in [0, 2^14)) of float values, round to nearest, ties to even."""
    if not torch.isfinite(values).all():
        raise ValueError("coefficient values must be finite to be stored in 14 bits")
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    bits = bits & 0xFFFFFFFF
    # Adding half an ulp minus one plus the kept lsb rounds ties to even on the integer
    # pattern; sign-magnitude layout makes that right for negative values too, and a carry
    # into the exponent is the correct round-up (to infinity past the largest finite).
    lsb = (bits >> _DROP) & 1
    codes = (bits + (1 << (_DROP - 1)) - 1 + lsb) >> _DROP
    if (codes & 0x3FFF).ne(codes).any() or ((codes & 0x1FE0) == 0x1FE0).any():
        raise ValueError("coefficient value too large for 14-bit storage (overflows bf16)")
    return codes


def code_to_float(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode 14-bit codes to ``dtype`` (exact for float32 and bf16)."""
    half = (codes.to(torch.int32) << 2) & 0xFFFF
    half = torch.where(half >= 0x8000, half - 0x10000, half)  # two's complement for int16 view
    return half.to(torch.int16).view(torch.bfloat16).to(dtype)


def quantize_values(values: torch.Tensor) -> torch.Tensor:
    """The float32 values a 14-bit store gives back."""
    return code_to_float(round_to_code(values)).reshape(values.shape)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor -> uint8, least-significant bit first, zero-padded."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 -> first n bits as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).bool().reshape(-1)[:n]


def pack_codes14(codes: torch.Tensor) -> torch.Tensor:
    """Flat int64 14-bit codes -> ceil(14 n / 8) uint8 bytes (little-endian bit stream)."""
    n = codes.numel()
    padded = torch.nn.functional.pad(codes.reshape(-1), (0, (-n) % _GROUP_CODES))
    groups = padded.view(-1, _GROUP_CODES)
    out = torch.empty(groups.shape[0], _GROUP_BYTES, dtype=torch.uint8)
    code_shift = torch.arange(_GROUP_CODES, dtype=torch.int64) * CODE_BITS
    byte_shift = torch.arange(_GROUP_BYTES, dtype=torch.int64) * 8
    for start in range(0, groups.shape[0], _CHUNK_GROUPS):
        chunk = groups[start:start + _CHUNK_GROUPS]
        word = (chunk << code_shift).sum(dim=1)  # 56 bits fit int64
        out[start:start + _CHUNK_GROUPS] = ((word[:, None] >> byte_shift) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[:values_nbytes(n, 1)].clone()


def unpack_codes14(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes14`: the first n codes as int64."""
    if packed.numel() != values_nbytes(n, 1):
        raise ValueError(f"values14 holds {packed.numel()} bytes, expected "
                         f"{values_nbytes(n, 1)} for {n} codes")
    padded = torch.nn.functional.pad(packed.reshape(-1), (0, (-packed.numel()) % _GROUP_BYTES))
    groups = padded.view(-1, _GROUP_BYTES)
    out = torch.empty(groups.shape[0], _GROUP_CODES, dtype=torch.int64)
    code_shift = torch.arange(_GROUP_CODES, dtype=torch.int64) * CODE_BITS
    byte_shift = torch.arange(_GROUP_BYTES, dtype=torch.int64) * 8
    for start in range(0, groups.shape[0], _CHUNK_GROUPS):
        chunk = groups[start:start + _CHUNK_GROUPS].to(torch.int64)
        word = (chunk << byte_shift).sum(dim=1)
        out[start:start + _CHUNK_GROUPS] = (word[:, None] >> code_shift) & 0x3FFF
    return out.reshape(-1)[:n]


def pack_codes(support: torch.Tensor, values: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """``{"mask": uint8, "values14": uint8}`` for codes with ``support``/``values`` (s x d2)."""
    if support.shape != values.shape or support.dim() != 2:
        raise ValueError(f"support {tuple(support.shape)} and values {tuple(values.shape)} "
                         "must both be s x d2")
    s, d2 = support.shape
    support = support.detach().cpu().to(torch.int64)
    if s and (support.min() < 0 or support.max() >= k):
        raise ValueError(f"support indices must lie in [0, {k})")
    if s > 1 and not (support[1:] > support[:-1]).all():
        raise ValueError("support must be strictly ascending within each column")
    bits = torch.zeros(d2, k, dtype=torch.bool)
    bits.scatter_(1, support.T, True)
    codes = round_to_code(values.detach().cpu().T.reshape(-1))
    return {"mask": pack_bits(bits), "values14": pack_codes14(codes)}


def unpack_codes(mask: torch.Tensor, values14: torch.Tensor, k: int, d2: int,
                 s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_codes`: ``(support int64, values float32)``, both s x d2."""
    if mask.dtype != torch.uint8 or values14.dtype != torch.uint8:
        raise ValueError("mask and values14 must be uint8")
    if mask.numel() != mask_nbytes(k, d2):
        raise ValueError(f"mask holds {mask.numel()} bytes, expected {mask_nbytes(k, d2)} "
                         f"for k={k}, d2={d2}")
    bits = unpack_bits(mask.cpu(), k * d2).view(d2, k)
    per_column = bits.sum(dim=1)
    if (per_column != s).any():
        raise ValueError(f"mask must set exactly s={s} atoms per column, found "
                         f"{int(per_column.min())}..{int(per_column.max())}")
    # nonzero() walks row-major: column j outer, atoms ascending inner = the values order.
    support = bits.nonzero()[:, 1].view(d2, s).T.contiguous()
    values = code_to_float(unpack_codes14(values14.cpu(), s * d2)).view(d2, s).T.contiguous()
    return support, values


def codes_dense(mask: torch.Tensor, values14: torch.Tensor, k: int, d2: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense k x d2 matrix S straight from the packed form."""
    bits = unpack_bits(mask.cpu(), k * d2).view(d2, k)
    n = int(bits.sum())
    values = code_to_float(unpack_codes14(values14.cpu(), n), dtype)
    dense_t = torch.zeros(d2, k, dtype=dtype)
    dense_t[bits] = values  # boolean assignment follows the same row-major order
    return dense_t.T.contiguous()
