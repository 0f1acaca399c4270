"""The top eigenpairs of a symmetric operator known only by its products (a Hessian-vector
product), warm-started from a subspace.

``top_eigenpairs(matvec, start, k)`` finds the k largest (algebraic) eigenvalues λ_1 ≥ … ≥ λ_k
of a symmetric A and orthonormal eigenvectors, starting from the block `start` (P, b), b ≥ k:
the previous call's ``subspace`` (a warm start), or random vectors (a cold start).

**Method: thick-restart Lanczos in its Davidson form** (Rayleigh–Ritz on a growing orthonormal
basis Q, expanded by the residuals of the wanted Ritz pairs that have not converged, restarted
by keeping the b leading Ritz vectors; Wu & Simon, SIAM J. Matrix Anal. Appl. 22 (2000);
Stathopoulos & Saad, "Restarting techniques for the (Jacobi-)Davidson symmetric eigenvalue
methods", ETNA 7 (1998)). Without a preconditioner a Ritz vector's residual lies in the next
Krylov space, so for one wanted pair the basis is the Krylov space of Lanczos (in exact
arithmetic), kept orthonormal by full re-orthogonalisation (classical Gram–Schmidt twice).

Why not LOBPCG (what the central flows' JAX port uses): LOBPCG searches the 3b-dimensional
space [X, R, P] only, a short-recurrence approximation of the same block Krylov space, so it
needs more products than a longer Krylov basis for the same accuracy when the spectrum decays
slowly, and its Gram matrices become ill-conditioned as it converges. Here a warm start and a
restart are the same operation (a Rayleigh–Ritz on the kept block), A·Q is stored beside Q so
Ritz vectors and residuals cost no product, and a product is applied to a block at once.

**Tolerance.** A Ritz pair (θ, v) has converged when ‖A v − θ v‖ ≤ tol·|θ| (or the round-off
floor 100·ε·max|θ| where that is larger). Then some eigenvalue lies within tol·|θ| of θ
(Bauer–Fike for a symmetric matrix), and within ‖r‖²/δ where δ separates θ from the rest of
the spectrum (Kato–Temple): the eigenvalue errors are ~tol² relative when the spectrum is gapped.

**Caveat.** Like any subspace method it can miss an eigenvalue whose eigenvector is orthogonal
to everything it explored; a warm start explores from the old block, so an eigenvalue that rose
from beyond its b vectors since the last call is found only through the Krylov growth. The
b − k extra vectors ("guards") carry the next eigenvectors so that crossings within the block
are followed.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError, bad_value, check_number


class Eigenpairs(NamedTuple):
    """The result of ``top_eigenpairs``.

    - `values`: (k,) the k largest Ritz values, descending;
    - `vectors`: (P, k) their orthonormal Ritz vectors;
    - `subspace`: (P, b) the b leading Ritz vectors (its first k columns are `vectors`): the
      start of the next call (a warm start);
    - `matvecs`: how many products A·v it took (a block of c columns counts c);
    - `converged`: whether all k pairs met the tolerance (False: `max_matvecs` ran out first);
    - `guard_values`: (b − k,) the Ritz values of the other columns of `subspace`, not converged:
      lower bounds of λ_{k+1} … λ_b (Cauchy interlacing).
    """

    values: Tensor
    vectors: Tensor
    subspace: Tensor
    matvecs: int
    converged: bool
    guard_values: Tensor


def top_eigenpairs(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    k: int,
    *,
    tol: float = 1e-8,
    max_basis: int | None = None,
    max_matvecs: int = 5000,
) -> Eigenpairs:
    """The k largest eigenpairs of a symmetric operator A (module docstring: the method).

    **Main arguments**

    - `matvec`: V (P, c) ↦ A V (P, c), for any number of columns c.
    - `start`: (P, b) the starting block, b ≥ k columns of full rank (a previous ``subspace``,
      or random vectors); b − k of them guard the k wanted ones.
    - `k`: how many eigenpairs.
    - `tol`: converged when ‖A v − θ v‖ ≤ tol·|θ|, which puts an eigenvalue within tol·|θ| of θ.

    **Other arguments**

    - `max_basis`: the basis size that triggers a restart (default max(3b, b + 20), at most P).
    - `max_matvecs`: give up (``converged=False``) after this many products.

    **Raises** `ConfigError` naming the argument that is malformed, before any product.
    """
    k = check_number("k", k, integer=True, minimum=1)
    tol = check_number("tol", tol, minimum=0.0, exclusive_minimum=True, maximum=1.0)
    max_matvecs = check_number("max_matvecs", max_matvecs, integer=True, minimum=1)
    if not isinstance(start, Tensor) or start.ndim != 2 or not start.is_floating_point():
        raise bad_value("start", getattr(start, "shape", type(start).__name__), "a floating (P, b) tensor")
    n, b = start.shape
    if not k <= b <= n:
        raise ConfigError(f"start: got {b} columns; expected at least k = {k} and at most P = {n}")
    if not torch.isfinite(start).all():
        raise ConfigError("start: contains NaN or Inf; expected finite vectors")
    if max_basis is None:
        max_basis = max(3 * b, b + 20)
    elif isinstance(max_basis, bool) or not isinstance(max_basis, numbers.Integral) or max_basis < b + k:
        raise bad_value("max_basis", max_basis, f"an integer >= b + k = {b + k}")
    max_basis = min(int(max_basis), n)
    eps = torch.finfo(start.dtype).eps

    basis, _ = torch.linalg.qr(start)
    image = matvec(basis)
    matvecs = b
    while True:
        # Rayleigh–Ritz on span(Q): T = Qᵀ A Q (symmetrised), Ritz pairs descending
        projected = basis.T @ image
        theta, y = torch.linalg.eigh(0.5 * (projected + projected.T))
        theta, y = theta.flip(0), y.flip(1)
        keep = min(b, basis.shape[1])
        vectors, images = basis @ y[:, :keep], image @ y[:, :keep]
        residuals = images - vectors * theta[:keep]
        floor = 100 * eps * float(theta.abs().max())
        done = residuals[:, :k].norm(dim=0) <= torch.clamp(tol * theta[:k].abs(), min=floor)
        if bool(done.all()) or matvecs >= max_matvecs:
            return Eigenpairs(theta[:k].clone(), vectors[:, :k], vectors, matvecs, bool(done.all()), theta[k:keep].clone())
        grow = residuals[:, :k][:, ~done]
        if basis.shape[1] + grow.shape[1] > max_basis:  # thick restart: keep the b leading Ritz vectors
            basis, image = vectors, images
        grow = _orthonormal_complement(grow, basis, floor)
        if grow.shape[1] == 0:  # span(Q) is invariant to round-off: nothing more to find
            return Eigenpairs(theta[:k].clone(), vectors[:, :k], vectors, matvecs, True, theta[k:keep].clone())
        basis, image = torch.cat([basis, grow], 1), torch.cat([image, matvec(grow)], 1)
        matvecs += grow.shape[1]


def _orthonormal_complement(w: Tensor, basis: Tensor, floor: float) -> Tensor:
    """An orthonormal basis of the part of span(w) orthogonal to span(basis): classical
    Gram–Schmidt twice against the basis ("twice is enough", Giraud et al. 2005), then a QR of
    what is left; columns whose remainder is below the round-off `floor` are dropped."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    q, r = torch.linalg.qr(w)
    return q[:, r.diagonal().abs() > max(floor, torch.finfo(w.dtype).tiny)]


class HessianOperator:
    """V ↦ ∇²L(θ) V at one θ (data loss, all examples, as ``Problem.hvp``): the loss and its
    gradient are evaluated once with their graph, then a block of columns costs one vmapped
    backward pass through that graph (``is_grads_batched``; one pass per column where vmap has
    no rule for an operation of the model), not the forward and backward ``hvp`` repeats.

    `problem` is a ``flowsim.Problem`` (or an object with its ``per_example_losses``); ``grad``
    is ∇L(θ) of the same graph, ``matvecs`` counts the columns applied."""

    def __init__(self, problem, theta: Tensor) -> None:
        self.leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            self.loss = problem.per_example_losses(self.leaf).mean()
            (self.grad,) = torch.autograd.grad(self.loss, self.leaf, create_graph=True)
        self.matvecs = 0
        #: whether a block of columns goes through one vmapped backward pass (``is_grads_batched``)
        self.batched = True

    def __call__(self, v: Tensor) -> Tensor:
        """H v for v (P,) or H V for V (P, c): the c columns in one vmapped backward pass, or one
        backward pass each where vmap cannot run the model's backward."""
        columns = v[:, None] if v.ndim == 1 else v
        self.matvecs += columns.shape[1]
        with torch.enable_grad():
            if columns.shape[1] > 1 and self.batched:
                try:
                    (out,) = torch.autograd.grad(self.grad, self.leaf, columns.T, retain_graph=True, is_grads_batched=True)
                    return out.T
                except RuntimeError:  # an operation without a batching rule: one column at a time from now on
                    self.batched = False
            out = torch.stack([torch.autograd.grad(self.grad, self.leaf, c, retain_graph=True)[0] for c in columns.T], 1)
        return out[:, 0] if v.ndim == 1 else out

    def third(self, u: Tensor) -> Tensor:
        """∇³L(θ)[u_i, u_j, ·] = ∇_θ (u_iᵀ ∇²L(θ) u_j) for the columns of u (P, m), every pair
        i ≤ j in ``torch.triu_indices`` order: (m(m+1)/2, P). One double backward with graph per
        column (H u_j) and one backward pass through it per pair."""
        pairs: dict[tuple[int, int], Tensor] = {}
        with torch.enable_grad():
            for j in range(u.shape[1]):
                (hv,) = torch.autograd.grad(self.grad, self.leaf, u[:, j], create_graph=True)
                for i in range(j + 1):
                    (pairs[i, j],) = torch.autograd.grad(hv @ u[:, i], self.leaf, retain_graph=True)
        i, j = torch.triu_indices(u.shape[1], u.shape[1])
        return torch.stack([pairs[a, b] for a, b in zip(i.tolist(), j.tolist())])
