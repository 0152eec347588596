"""Batch-OMP: exactly ``s`` atoms per column, Gram-based, vectorised over many columns.

Given ``G = D^T D`` (k x k) and ``A = D^T W`` (k x N) it never touches ``D`` or ``W``.
Each column keeps ``L^{-T}`` of the Cholesky factor of its selected atoms' Gram, grown one
row per step (``U`` below, in selection coordinates). Step j of every column at once:

    i_j   = argmax |alpha| over unselected atoms
    l     = (q_m[i_j])_m = U^T G[I, i_j]    (new row of the Cholesky factor L)
    l_jj  = sqrt(G[i_j, i_j] - |l|^2)
    u_j   = (e_j - U l) / l_jj              (direction of the new orthonormalised atom)
    c_j   = u_j . alpha[I]                  (residual's component along it)
    q_j   = G u_j                           (one dense matmul over all columns)
    alpha -= c_j q_j
    gamma += c_j u_j

so the correlation update, the bulk of the work, is one ``(N x k) @ (k x k)`` matmul per
step rather than N scattered matrix-vector products. Columns are processed in chunks sized
from a memory budget, so peak memory is bounded whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_MEMORY_BYTES = 1 << 30


@dataclass
class SparseCodes:
    support: torch.Tensor  # s x N int64, ascending within each column
    values: torch.Tensor  # s x N

    def dense(self, k: int) -> torch.Tensor:
        codes = torch.zeros(k, self.support.shape[1], dtype=self.values.dtype,
                            device=self.values.device)
        return codes.scatter_(0, self.support, self.values)


def chunk_columns(k: int, s: int, itemsize: int, max_chunk: int,
                  memory_bytes: int = DEFAULT_MEMORY_BYTES, atoms_per_step: int = 1) -> int:
    """Columns per chunk from the per-column state. Exact OMP: the q's (s x k), the
    triangle of U (~s^2 / 2 plus block padding), ~5 k-vectors. gOMP keeps no q's: the
    triangle, ~5 k-vectors and two b x s step buffers, so its chunks are ~k / s x larger."""
    triangle = s * (s + 32) // 2
    if atoms_per_step == 1:
        per_column = itemsize * (s * k + triangle + 5 * k + 2 * s)
    else:
        per_column = itemsize * (triangle + 5 * k + 2 * s + 2 * atoms_per_step * s)
    per_column += 8 * s + k  # int64 support, bool selection mask
    return max(1, min(max_chunk, memory_bytes // per_column))


def batch_omp(gram: torch.Tensor, correlations: torch.Tensor, sparsity: int,
              max_chunk: int = 8192, memory_bytes: int = DEFAULT_MEMORY_BYTES,
              atoms_per_step: int = 1) -> SparseCodes:
    """Code every column of ``W`` with exactly ``sparsity`` atoms of ``D``.

    ``gram`` is ``D^T D`` (k x k), ``correlations`` is ``D^T W`` (k x N), same dtype/device.
    ``atoms_per_step = 1`` is exact OMP; ``b > 1`` is generalised OMP (gOMP: the b atoms
    of largest correlation join at once, then one joint least-squares update), which needs
    s / b steps instead of s and so does about b times less work.
    """
    if atoms_per_step < 1:
        raise ValueError(f"atoms_per_step must be >= 1, got {atoms_per_step}")
    k, n_columns = correlations.shape
    if gram.shape != (k, k):
        raise ValueError(f"Gram {tuple(gram.shape)} does not match correlations {(k, n_columns)}")
    if not 1 <= sparsity <= k:
        raise ValueError(f"sparsity must be in [1, {k}], got {sparsity}")
    chunk = chunk_columns(k, sparsity, correlations.element_size(), max_chunk, memory_bytes,
                          atoms_per_step)
    supports, values = [], []
    for start in range(0, n_columns, chunk):
        block = correlations[:, start:start + chunk].T.contiguous()
        if atoms_per_step == 1:
            support, coefficients = _omp_chunk(gram, block, sparsity)
        else:
            support, coefficients = _gomp_chunk(gram, block, sparsity, atoms_per_step)
        supports.append(support)
        values.append(coefficients)
    support = torch.cat(supports, dim=0)
    coefficients = torch.cat(values, dim=0)
    order = support.argsort(dim=1)
    support = support.gather(1, order)
    coefficients = coefficients.gather(1, order)
    return SparseCodes(support.T.contiguous(), coefficients.T.contiguous())


class _TriangleRows:
    """The rows u_m of U^T (U = L^{-T}), row m non-zero in columns <= m only, stored in
    contiguous row blocks each just as wide as its rows can be: products with U^T then
    read the triangle's non-zeros only (half a square) as one bmm per block, and the
    store never re-grows (a copy of everything so far) as rows are added."""

    def __init__(self, n: int, sparsity: int, dtype: torch.dtype, device: torch.device,
                 rows_per_block: int = 32):
        self.n, self.sparsity, self.rows_per_block = n, sparsity, rows_per_block
        self.dtype, self.device = dtype, device
        self.blocks: list[torch.Tensor] = []  # block i: rows [i R, i R + R), width <= (i + 1) R

    def _block(self, index: int) -> torch.Tensor:
        while len(self.blocks) <= index:
            lo = len(self.blocks) * self.rows_per_block
            width = min(self.sparsity, lo + self.rows_per_block)
            self.blocks.append(torch.zeros(self.n, width - lo, width, dtype=self.dtype,
                                           device=self.device))
        return self.blocks[index]

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Rows ``start ..`` (N x b x (start + b)); earlier rows stay as they are."""
        for offset in range(rows.shape[1]):
            m = start + offset
            block = self._block(m // self.rows_per_block)
            block[:, m % self.rows_per_block, :m + 1] = rows[:, offset, :m + 1]

    def _spans(self, j: int):
        """(first row, block, rows, columns) of each block's part of U^T[:j, :j]."""
        for index in range((j + self.rows_per_block - 1) // self.rows_per_block):
            lo = index * self.rows_per_block
            block = self.blocks[index]
            yield lo, block, min(block.shape[1], j - lo), min(block.shape[2], j)

    def left_multiply(self, coefficients: torch.Tensor, j: int, out: torch.Tensor) -> None:
        """out (N x b x j) = sum_{m < j} coefficients[:, :, m] u_m, i.e. C @ U^T[:j, :j]."""
        out.zero_()
        for lo, block, rows, used in self._spans(j):
            out[..., :used] += torch.bmm(coefficients[..., lo:lo + rows],
                                         block[:, :rows, :used])

    def right_multiply(self, vectors: torch.Tensor, j: int, out: torch.Tensor) -> None:
        """out (N x b x j) = vectors (N x b x j) @ U^T[:j, :j]^T: out[..., m] = vectors . u_m."""
        for lo, block, rows, used in self._spans(j):
            out[..., lo:lo + rows] = torch.bmm(vectors[..., :used],
                                               block[:, :rows, :used].mT)


def _omp_chunk(gram: torch.Tensor, alpha0: torch.Tensor,
               sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP for the N columns of one chunk; ``alpha0`` is N x k. Returns N x s support/values
    in selection order."""
    n, k = alpha0.shape
    dtype, device = alpha0.dtype, alpha0.device
    # An atom whose remaining norm falls below this share of its own norm is linearly
    # dependent on the selected ones: take it with coefficient 0 instead of dividing by ~0.
    dependent = 100 * torch.finfo(dtype).eps
    diag = gram.diagonal()
    rows = torch.arange(n, device=device)
    alpha = alpha0.clone()
    selected = torch.zeros(n, k, dtype=torch.bool, device=device)
    support = torch.zeros(n, sparsity, dtype=torch.long, device=device)
    gamma = torch.zeros(n, sparsity, dtype=dtype, device=device)
    direction = torch.zeros(n, k, dtype=dtype, device=device)
    # Every per-step buffer is allocated once: fresh N x k temporaries each step cost more
    # in page faults (glibc maps buffers this size afresh) than the arithmetic on them.
    score = torch.empty(n, k, dtype=dtype, device=device)
    l_buffer = torch.zeros(n, sparsity, dtype=dtype, device=device)  # l, zero beyond step j
    # q_m = G u_m for every step so far: the new Cholesky row is a gather from it
    # (l_m = q_m[i_j]) instead of a triangular product.
    projections = torch.empty(n, sparsity, k, dtype=dtype, device=device)
    triangle = _TriangleRows(n, sparsity, dtype, device)
    u_buffer = torch.empty(n, 1, sparsity, dtype=dtype, device=device)
    for j in range(sparsity):
        torch.abs(alpha, out=score).masked_fill_(selected, -1.0)
        atom = score.argmax(dim=1)
        support[:, j] = atom
        selected[rows, atom] = True
        atom_norm2 = diag[atom]
        l_row = l_buffer[:, :j]
        if j:
            l_row[:] = projections[:, :j].gather(2, atom.view(n, 1, 1).expand(n, j, 1))[..., 0]
        remaining = atom_norm2 - torch.linalg.vector_norm(l_row, dim=1).square()
        u = u_buffer[:, :, :j + 1]
        triangle.left_multiply(l_buffer[:, None, :j], j, u[..., :j])  # U l
        u = u[:, 0].neg_()
        u[:, j] = 1.0
        independent = remaining > dependent * atom_norm2
        l_jj = remaining.clamp_min(torch.finfo(dtype).tiny).sqrt()
        u.div_(l_jj[:, None]).mul_(independent[:, None])
        triangle.write(j, u[:, None])
        # The residual is orthogonal to the atoms already chosen (alpha[I] = 0), so
        # u . alpha[I] is its last term alone.
        coefficient = alpha.gather(1, atom[:, None])[:, 0].mul_(u[:, j])
        # Earlier steps wrote only inside this step's support: no need to clear the rest.
        direction.scatter_(1, support[:, :j + 1], u)
        q = torch.mm(direction, gram, out=projections[:, j])
        alpha.addcmul_(coefficient[:, None], q, value=-1.0)
        gamma[:, :j + 1].addcmul_(coefficient[:, None], u)
    return support, gamma


def _gomp_chunk(gram: torch.Tensor, alpha0: torch.Tensor, sparsity: int,
                atoms_per_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gOMP for one chunk: per step b atoms join, and the Cholesky factor grows by a block.

    With L the Cholesky factor of the selected atoms' Gram and U = L^{-T} (rows u_m kept in
    ``directions``), b new atoms A extend it by ``L21^T = U^T G[I, A]`` and
    ``L22 = chol(G[A, A] - L21 L21^T)``; the new rows of U^T are
    ``[-(L22^{-1} L21) U^T, L22^{-1}]``. Both products with U^T are vector-matrix bmm's
    with b right-hand rows, and the correlation update is one dense matmul per step for
    the b directions together.
    """
    n, k = alpha0.shape
    dtype, device = alpha0.dtype, alpha0.device
    dependent = 100 * torch.finfo(dtype).eps
    gram = gram.contiguous()  # _gram_entries reads it flat
    diag = gram.diagonal()
    alpha = alpha0.clone()
    selected = torch.zeros(n, k, dtype=torch.bool, device=device)
    support = torch.zeros(n, sparsity, dtype=torch.long, device=device)
    gamma = torch.zeros(n, sparsity, dtype=dtype, device=device)
    direction = torch.zeros(n, k, dtype=dtype, device=device)
    triangle = _TriangleRows(n, sparsity, dtype, device)
    product = torch.empty(n, atoms_per_step, sparsity, dtype=dtype, device=device)
    new_rows_buffer = torch.empty(n, atoms_per_step, sparsity, dtype=dtype, device=device)
    # per-step N x k buffers allocated once, as in _omp_chunk
    score = torch.empty(n, k, dtype=dtype, device=device)
    update = torch.empty(n, k, dtype=dtype, device=device)
    j = 0
    while j < sparsity:
        b = min(atoms_per_step, sparsity - j)
        torch.abs(alpha, out=score).masked_fill_(selected, -1.0)
        atoms = score.topk(b, dim=1).indices  # N x b
        support[:, j:j + b] = atoms
        selected.scatter_(1, atoms, True)
        if j:
            cross = _gram_entries(gram, atoms, support[:, :j])  # G[A, I], N x b x j
            l21 = product[:, :b, :j]  # (U^T G[I, A])^T
            triangle.right_multiply(cross, j, l21)
        else:
            l21 = torch.zeros(n, b, 0, dtype=dtype, device=device)
        schur = _gram_entries(gram, atoms, atoms) - l21 @ l21.mT
        l22, keep = _masked_cholesky(schur, dependent * diag[atoms])
        l21 = l21 * keep[..., None]
        inv_l22 = torch.linalg.solve_triangular(
            l22, torch.eye(b, dtype=dtype, device=device).expand(n, b, b), upper=False)
        inv_l22 = inv_l22 * keep[..., None]  # dropped (dependent) atoms: zero direction
        new_rows = new_rows_buffer[:, :b, :j + b]
        if j:
            triangle.left_multiply(inv_l22 @ l21, j, new_rows[..., :j])
            new_rows[..., :j].neg_()
        new_rows[..., j:] = inv_l22
        triangle.write(j, new_rows)
        # The residual is orthogonal to the atoms already chosen (alpha[I] = 0), so only
        # the new atoms' correlations enter the new rows' coefficients.
        coefficient = inv_l22 @ alpha.gather(1, atoms).unsqueeze(2)  # N x b x 1
        step = (coefficient * new_rows).sum(dim=1)  # N x (j + b): sum_t c_t u_t
        # Earlier steps wrote only inside this step's support: no need to clear the rest.
        direction.scatter_(1, support[:, :j + b], step)
        alpha.sub_(torch.mm(direction, gram, out=update))
        gamma[:, :j + b].add_(step)
        j += b
    return support, gamma


def _gram_entries(gram: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``G[rows[n, a], columns[n, c]]`` (N x a x c) through one flat index_select: ~4x
    faster on CPU than broadcast advanced indexing, and nothing N x a x k in between."""
    n, a = rows.shape
    flat = (rows[:, :, None] * gram.shape[1] + columns[:, None, :]).reshape(-1)
    return gram.view(-1).index_select(0, flat).view(n, a, columns.shape[1])


def _masked_cholesky(matrix: torch.Tensor,
                     floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky of a batch of small SPD blocks that drops (rather than divides by) pivots
    at or below ``floor``: such atoms depend on those already chosen. Returns the factor
    (unit row and column for a dropped atom) and the mask of kept atoms."""
    n, b, _ = matrix.shape
    lower = torch.zeros_like(matrix)
    keep = torch.zeros(n, b, dtype=torch.bool, device=matrix.device)
    for t in range(b):
        pivot = matrix[:, t, t] - (lower[:, t, :t] ** 2).sum(dim=1)
        ok = pivot > floor[:, t]
        keep[:, t] = ok
        root = torch.where(ok, pivot.clamp_min(torch.finfo(matrix.dtype).tiny).sqrt(), 1.0)
        lower[:, t, :t] *= ok[:, None]
        lower[:, t, t] = root
        if t + 1 < b:
            below = matrix[:, t + 1:, t] - torch.bmm(lower[:, t + 1:, :t],
                                                      lower[:, t, :t, None]).squeeze(2)
            lower[:, t + 1:, t] = torch.where(ok[:, None], below / root[:, None], 0.0)
    return lower, keep
