"""Fused Triton kernel: ``y = z @ S`` straight from the packed codes (no dense S anywhere).

cospadi copies this file verbatim next to ``modeling_cospadi.py`` in a compressed
checkpoint; it imports torch and, when installed, triton (CUDA builds of torch ship it).
Without triton, or without CUDA (unless ``TRITON_INTERPRET=1``), it imports no triton
and :data:`AVAILABLE` is False.

Packed codes (storage/sparse_format.py): ``mask`` holds the k x d2 support bit-mask
column-major (bit ``j k + i`` = atom i used by column j, LSB first); ``values14`` the s d2
non-zeros in mask order as a little-endian stream of 14-bit codes (bf16 bits >> 2). Every
column has exactly s non-zeros, so column j's values are codes ``[j s, (j + 1) s)`` and an
atom's code is found from the number of set bits before it in its column.

One program computes a BLOCK_M x BLOCK_N tile of y: it walks the atoms in chunks of
BLOCK_K, loads the tile's mask bits, ranks them by a cumulative sum (plus the running count
of earlier chunks), gathers and decodes their 14-bit codes into a BLOCK_K x BLOCK_N tile of
S in registers and multiplies it with the z tile. S is never written to memory.
"""

from __future__ import annotations

import os

import torch


def _interpreting() -> bool:
    # Triton's CPU interpreter (TRITON_INTERPRET=1, the tests)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


triton = tl = None
if torch.cuda.is_available() or _interpreting():  # importing triton costs ~70 MiB of RSS
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only torch builds: the modeling file falls back to torch
        triton = tl = None

AVAILABLE = triton is not None

if AVAILABLE:
    @triton.jit
    def _codes_matmul_kernel(z_ptr, mask_ptr, codes_ptr, out_ptr, M, K, N, S, code_bytes,
                             stride_zm, stride_zk, stride_om, stride_on,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col = rn.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        seen = tl.zeros((BLOCK_N,), dtype=tl.int32)  # set bits of earlier chunks, per column
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            inside = (rk[:, None] < K) & (rn[None, :] < N)
            bit = col[None, :] * K + rk[:, None]
            byte = tl.load(mask_ptr + (bit >> 3), mask=inside, other=0).to(tl.int32)
            on = (((byte >> (bit & 7).to(tl.int32)) & 1) != 0) & inside
            rank = tl.cumsum(on.to(tl.int32), axis=0) - 1 + seen[None, :]
            first = (col[None, :] * S + rank.to(tl.int64)) * 14  # first bit of the code
            at = first >> 3
            word = tl.load(codes_ptr + at, mask=on, other=0).to(tl.int32)
            word |= tl.load(codes_ptr + at + 1, mask=on & (at + 1 < code_bytes),
                            other=0).to(tl.int32) << 8
            word |= tl.load(codes_ptr + at + 2, mask=on & (at + 2 < code_bytes),
                            other=0).to(tl.int32) << 16
            code = (word >> (first & 7).to(tl.int32)) & 0x3FFF
            # a code is the top 14 bits of a bf16, i.e. of a float32: shift and reinterpret
            value = (code << 18).to(tl.float32, bitcast=True)
            value = tl.where(on, value, 0.0)
            zt = tl.load(z_ptr + rm[:, None] * stride_zm + rk[None, :] * stride_zk,
                         mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(zt.to(tl.float32), value, input_precision="ieee")
            else:  # bf16 / fp16 activations: the codes are exact in bf16
                acc += tl.dot(zt, value.to(zt.dtype))
            seen += tl.sum(on.to(tl.int32), axis=0)
        out = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def codes_matmul(z: torch.Tensor, mask: torch.Tensor, values14: torch.Tensor, k: int,
                 s: int, d2: int, block_m: int = 16, block_n: int = 64,
                 block_k: int = 32) -> torch.Tensor:
    """``z (M x k) @ S (k x d2)`` with S given by its packed ``mask`` / ``values14``."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    if z.dim() != 2 or z.shape[1] != k:
        raise ValueError(f"z must be M x k = M x {k}, got {tuple(z.shape)}")
    m = z.shape[0]
    out = torch.empty(m, d2, dtype=z.dtype, device=z.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d2, block_n))
    _codes_matmul_kernel[grid](z, mask, values14, out, m, k, d2, s, values14.numel(),
                               z.stride(0), z.stride(1), out.stride(0), out.stride(1),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               # the interpreter (triton 3.9) gets bf16 dots wrong: there the
                               # tile product runs in float32, exact for bf16 inputs
                               IEEE=z.dtype == torch.float32 or _interpreting())
    return out
