"""The closed-form dictionary solver (``--solver closed``, the default).

Learns ``W_L ~ D S`` (whitened W, d1 x d2; D d1 x k; S with exactly s non-zeros per
column) from dense matmuls, a few SVDs / Cholesky factorisations of small matrices and
batched top-s selection (METHOD.md, "Closed-form dictionary steps"):

1. SVD warm start. ``W_L = U Sigma V^T`` (the SVD SVD-LLM needs anyway, which also gives
   SVD-LLM's error at the same budget for free). Everything below runs in the coordinates
   ``X = Sigma V^T`` (m x d2, m = min(d1, d2)): an optimal dictionary lies in the range of
   W_L, so a 1536-wide down_proj is solved as a 576-wide problem. D starts as the top-k
   singular directions.
2. Orthonormal alternation (k <= m). Codes: with ``D^T D = I`` the best s-sparse code of
   a column keeps its s largest entries of ``D^T X`` (exact, no OMP; the support rule of
   ``supports.py``). Dictionary: orthogonal Procrustes, ``D = P Q^T`` from the thin SVD
   of ``X S^T``. Neither step can raise the error; stops when an iteration gains less
   than ``tol`` of the error.
3. Atoms beyond an orthonormal basis (k > m, e.g. a grouped gate/up whose d2 is much
   larger than d1): the k - m extra atoms start as the top singular directions of the
   residual; each column then proposes the support of its least-squares code on the whole
   dictionary and keeps it only if its refitted error is lower.
4. Least-squares refinement on the fixed support: ``D = X S^T (S S^T)^{-1}`` (one k x k
   Cholesky), then every column's codes refitted on its support (conjugate gradients on
   all columns at once). Rounds repeat (at most ``refine``) until one gains less than
   ``tol``: on flat whitened spectra (v_proj) each round still pays. The dictionary step
   is an exact minimiser and kept only if it lowers the error; a column's new codes are
   kept only where its error is lower, so the error never rises above the warm start.

The SVD and the recorded final error are float64, the iterations run in ``dtype``; the
result is the whitened dictionary (``U D``) and the codes.
"""

from __future__ import annotations

import time

import torch

from .factors import DictionarySolution
from .supports import SupportRule, top_s

DEFAULT_ITERS = 15  # orthonormal alternation, at most (stops earlier on tol)
DEFAULT_REFINE = 20  # least-squares rounds on the fixed support, at most
DEFAULT_TOL = 1e-4  # stop alternating / refining when a step gains less than this share
RIDGE = 1e-10  # relative ridge of the k x k normal equations (unused atoms), float64
DEFAULT_CG_STEPS = 3  # conjugate-gradient steps of a code refit (8 gave the same errors)


def solve_closed(whitened: torch.Tensor, k: int, s: int, *, iters: int = DEFAULT_ITERS,
                 refine: int = DEFAULT_REFINE, tol: float = DEFAULT_TOL,
                 rule: SupportRule = top_s, order: torch.Tensor | None = None,
                 shared_columns: int = 1, svd_rank: int | None = None,
                 dtype: torch.dtype = torch.float64, rotated: bool = False
                 ) -> DictionarySolution:
    """``whitened`` (d1 x d2) ~ D S with k atoms and s non-zeros per column.

    ``rule``: the support step (structured supports plug in here); ``order``: the warm
    start's atoms as a permutation of the singular directions (2:4 interleaves them,
    ``supports.atom_order``); ``shared_columns``: columns that share one support (block
    supports), so a proposed support is accepted or refused per block of them.
    ``svd_rank``: SVD-LLM's rank at the same budget, to record its error (stats).
    ``dtype``: precision of the alternation and the refinement (float32 halves their time
    on CPU and gave the same errors to 4 digits on SmolLM2's matrices: orthonormal steps
    are well conditioned, and the refinement's normal equations are ridged at the
    precision's scale); the SVD, the k > d1 extension and the recorded final error are
    float64.
    ``rotated``: ``whitened`` is already ``Sigma V^T`` of a matrix (orthogonal rows by
    decreasing norm, e.g. ``curves.spectrum``'s codes): its SVD is skipped and the
    solution is in that basis (same errors; the allocation's calibrating solve).
    """
    d1, d2 = whitened.shape
    if not 1 <= s <= min(k, d1):
        raise ValueError(f"need 1 <= s <= min(k, d1); got s={s}, k={k}, d1={d1}")
    started = time.perf_counter()
    if rotated:
        x = whitened.to(torch.float64)
        sigma = x.norm(dim=1)
        u = torch.eye(d1, dtype=torch.float64, device=x.device)
    else:
        u, sigma, vh = torch.linalg.svd(whitened.to(torch.float64), full_matrices=False)
        x = sigma[:, None] * vh  # m x d2
        del vh
    m = x.shape[0]
    total = sigma.square().sum().item() or 1.0
    stats: dict = {"k": k, "s": s}
    if svd_rank is not None:
        stats["svd_llm_error"] = _relative(sigma[svd_rank:].square().sum().item(), total)
    seconds_svd = time.perf_counter() - started

    k0 = min(k, m)
    work = x.to(dtype)
    dictionary = torch.eye(m, k0, dtype=dtype, device=x.device)
    if order is not None:
        dictionary = dictionary[:, order.to(x.device)]
    dictionary, codes, errors = _alternate(work, dictionary, s, iters, tol, rule, total)
    stats["warm_error"] = errors[0]
    stats["alternation_iters"] = len(errors) - 1
    if k > k0:  # float64: least-squares codes on an overcomplete dictionary
        dictionary, codes = _extend(x, dictionary.double(), codes.double(), k - k0, rule,
                                    shared_columns)
        errors.append(_relative(_residual_energy(x, dictionary, codes), total))
        dictionary, codes = dictionary.to(dtype), codes.to(dtype)
    norms = work.square().sum(dim=0, dtype=torch.float64)
    columns = _column_energy(work, dictionary, codes).double()
    refined = len(errors)
    for _ in range(refine):
        dictionary, codes, columns = _refine(work, norms, dictionary, codes, columns)
        errors.append(_relative(columns.sum().item(), total))
        if errors[-2] - errors[-1] <= tol * errors[-2]:
            break
    stats["refine_rounds"] = len(errors) - refined
    dictionary, codes = dictionary.double(), codes.double()
    # the result's float64 error: the rounds' energies come from k-space products (they
    # cancel at small errors), a float32 solve's are float32
    exact = _relative(_residual_energy(x, dictionary, codes), total)
    if dtype != torch.float64:
        errors.append(exact)
    else:
        errors[-1] = exact
    support, values = _sparse(codes, s)
    stats["errors"] = errors
    stats["error"] = errors[-1]
    stats["seconds_svd"] = seconds_svd
    stats["seconds"] = time.perf_counter() - started
    return DictionarySolution(u @ dictionary, support, values, stats)


def _energy(codes: torch.Tensor) -> float:
    return codes.square().sum(dtype=torch.float64).item()


def _relative(energy: float, total: float) -> float:
    return max(energy, 0.0) ** 0.5 / total ** 0.5


def _threshold(correlations: torch.Tensor, s: int, rule: SupportRule) -> torch.Tensor:
    """The best codes on the rule's support for an orthonormal dictionary (k x d2 dense)."""
    support = rule(correlations.square(), s)
    return torch.zeros_like(correlations).scatter_(0, support, correlations.gather(0, support))


def _alternate(x: torch.Tensor, dictionary: torch.Tensor, s: int, iters: int, tol: float,
               rule: SupportRule, total: float):
    """Orthonormal alternation from ``dictionary`` (m x k0, orthonormal columns)."""
    codes = _threshold(dictionary.T @ x, s, rule)
    errors = [_relative(total - _energy(codes), total)]
    for _ in range(iters):
        candidate = polar(x @ codes.T)  # Procrustes
        fresh = _threshold(candidate.T @ x, s, rule)
        error = _relative(total - _energy(fresh), total)
        if error > errors[-1]:  # cannot happen but by rounding: keep the better pair
            break
        dictionary, codes = candidate, fresh
        errors.append(error)
        if errors[-2] - error <= tol * errors[-2]:
            break
    return dictionary, codes, errors


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``P Q^T`` of ``matrix = P Sigma Q^T`` (m x k, k <= m):
    the Procrustes solution. The SVD is exact for every M; the alternatives measured on
    SmolLM2's M (sigma_min / sigma_max 3e-5 to 2e-2, k and v, one CPU thread) are not
    cheaper: ``eigh`` of the float32 Gram loses orthonormality; of the float64 Gram it is
    exact and takes the SVD's time; matmul-only Newton-Schulz (quintic, scaled) needs
    10-15 steps, 5-7 ms at 192 x 115 and 25-34 ms at 384 x 202 against the SVD's 4 and
    12 ms. A warm start cannot cut the steps: they act on M's singular values, and a
    start from the previous factor converges to the polar factor of a different matrix."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _residual_energy(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor) -> float:
    return (x - dictionary @ codes).square().sum().item()


def _column_energy(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (x - dictionary @ codes).square().sum(dim=0)


def _support_of(codes: torch.Tensor, s: int) -> torch.Tensor:
    """The s atoms of each column (zero-valued ones fill up columns that use fewer)."""
    support = (codes != 0).to(torch.int8).argsort(dim=0, descending=True, stable=True)[:s]
    return support.sort(dim=0).values


def _sparse(codes: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    support = _support_of(codes, s)
    return support, codes.gather(0, support)


def codes_on_support(gram: torch.Tensor, correlations: torch.Tensor, codes: torch.Tensor,
                     steps: int = DEFAULT_CG_STEPS) -> torch.Tensor:
    """Least-squares codes of every column on its current support (the non-zeros of
    ``codes``, k x N), by ``steps`` of conjugate gradients on ``G_II x = (D^T w)_I`` run on
    all columns at once: each step is one k x k by k x N matmul (no per-column s x s
    factorisation: batched small Cholesky solves ran at ~0.3 GFLOP/s on the CPU, 50x
    below the matmul rate). Started from ``codes``, each step lowers every column's error
    (CG minimises the quadratic over a growing subspace); near-orthonormal dictionaries
    (ours start orthonormal) converge in a few steps."""
    return _conjugate_gradients(gram, correlations, codes, gram @ codes, steps)[0]


def _conjugate_gradients(gram: torch.Tensor, correlations: torch.Tensor, codes: torch.Tensor,
                         image: torch.Tensor, steps: int = DEFAULT_CG_STEPS):
    """:func:`codes_on_support` given ``image = gram @ codes``; also returns the final
    residual ``(correlations - gram @ solution)`` on the support (what the energies need)."""
    mask = (codes != 0).to(codes.dtype)
    solution = codes.clone()
    residual = (correlations - image) * mask  # minus the gradient, on the support
    direction = residual.clone()
    energy = residual.square().sum(dim=0)
    floor = torch.finfo(codes.dtype).tiny
    for _ in range(steps):
        image = (gram @ direction) * mask
        curvature = (direction * image).sum(dim=0)
        step = torch.where(curvature > floor, energy / curvature.clamp_min(floor), 0.0)
        solution.addcmul_(direction, step[None, :])
        residual.addcmul_(image, step[None, :], value=-1.0)
        fresh = residual.square().sum(dim=0)
        direction.mul_(torch.where(energy > floor, fresh / energy.clamp_min(floor), 0.0)
                       [None, :]).add_(residual)
        energy = fresh
    return solution, residual


def _refit(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor,
           columns: torch.Tensor, proposal: torch.Tensor | None = None,
           shared_columns: int = 1):
    """Codes refitted on their support (or on the support of ``proposal``, starting from
    its values), kept column by column only where the error falls. ``columns``: the
    per-column residual energies of ``codes``; returns the codes and theirs."""
    gram, correlations = dictionary.T @ dictionary, dictionary.T @ x
    start = codes if proposal is None else proposal
    fresh = codes_on_support(gram, correlations, start)
    fresh_columns = _column_energy(x, dictionary, fresh)
    gain = columns - fresh_columns
    if shared_columns > 1:  # a block's columns keep or change their support together
        gain = gain.reshape(-1, shared_columns).sum(dim=1).repeat_interleave(shared_columns)
    better = gain > 0
    return (torch.where(better[None, :], fresh, codes),
            torch.where(better, fresh_columns, columns))


def _least_squares_dictionary(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """argmin_D ||X - D S||: X S^T (S S^T)^{-1}, by Cholesky (ridged: unused atoms)."""
    gram = codes @ codes.T
    scale = max(RIDGE, 10 * torch.finfo(gram.dtype).eps)  # 1e-10 in float64, 1e-6 in float32
    ridge = scale * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    gram.diagonal().add_(ridge)
    lower = torch.linalg.cholesky(gram)
    return torch.cholesky_solve((x @ codes.T).T, lower).T


def _energies(norms: torch.Tensor, codes: torch.Tensor, correlations: torch.Tensor,
              image: torch.Tensor) -> torch.Tensor:
    """Per-column residual energies ``||x||^2 - 2 c . D^T x + c . D^T D c`` from k-space
    products the round needs anyway (``image = D^T D c`` on the support at least; ``norms``
    the float64 ``||x||^2``), summed in float64: no m x N reconstruction per check."""
    return norms - (codes * (2 * correlations - image)).sum(dim=0, dtype=torch.float64)


def _refine(x: torch.Tensor, norms: torch.Tensor, dictionary: torch.Tensor,
            codes: torch.Tensor, columns: torch.Tensor):
    """One least-squares round on the fixed support: dictionary, then codes. ``columns``:
    the per-column residual energies (float64), carried so that no step recomputes them;
    ``norms``: the columns' float64 squared norms. The Gram, correlations and ``G S`` of
    the candidate dictionary serve its check, the refit's start and its energies."""
    fresh = _least_squares_dictionary(x, codes)
    lengths = fresh.norm(dim=0)
    used = lengths > 0
    # unit atoms (codes rescaled to match): the product is unchanged
    tiny = torch.finfo(fresh.dtype).tiny
    candidate = torch.where(used[None, :], fresh / lengths.clamp_min(tiny), dictionary)
    scaled = codes * torch.where(used, lengths, 1.0)[:, None]
    gram, correlations = candidate.T @ candidate, candidate.T @ x
    image = gram @ scaled
    energies = _energies(norms, scaled, correlations, image)
    if energies.sum() < columns.sum():
        dictionary, codes, columns = candidate, scaled, energies
    else:
        gram, correlations = dictionary.T @ dictionary, dictionary.T @ x
        image = gram @ codes
    refit, residual = _conjugate_gradients(gram, correlations, codes, image)
    # on the support G c = D^T x - residual, off it c = 0: ||x||^2 - c . (D^T x + residual)
    refit_columns = norms - (refit * (correlations + residual)).sum(dim=0, dtype=torch.float64)
    better = refit_columns < columns
    return (dictionary, torch.where(better[None, :], refit, codes),
            torch.where(better, refit_columns, columns))


def _extend(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor, extra: int,
            rule: SupportRule, shared_columns: int = 1):
    """k > m: add ``extra`` atoms along the residual's top directions, then let each column
    take the support of its least-squares code on the whole dictionary if that fits it
    better."""
    m = x.shape[0]
    s = int((codes != 0).sum(dim=0).max().item())
    residual = x - dictionary @ codes
    left, _, _ = torch.linalg.svd(residual, full_matrices=False)
    atoms = [left[:, :min(extra, left.shape[1])]]
    generator = torch.Generator().manual_seed(0)
    while sum(a.shape[1] for a in atoms) < extra:  # more extras than dimensions
        count = extra - sum(a.shape[1] for a in atoms)
        noise = torch.randn(m, min(count, m), generator=generator, dtype=x.dtype).to(x.device)
        atoms.append(noise / noise.norm(dim=0))
    dictionary = torch.cat([dictionary, *atoms], dim=1)
    codes = torch.cat([codes, codes.new_zeros(extra, codes.shape[1])], dim=0)
    full = torch.linalg.lstsq(dictionary, x).solution  # min-norm codes on all k atoms
    support = rule(full.square() * dictionary.square().sum(dim=0)[:, None], s)
    proposal = torch.zeros_like(full).scatter_(0, support, full.gather(0, support))
    codes, _ = _refit(x, dictionary, codes, _column_energy(x, dictionary, codes), proposal,
                      shared_columns)
    return dictionary, codes
