"""Law: a quantity that a symmetry of the loss conserves under gradient flow.

A law is a vector of components, each a signed sum of simple forms of one site's parameter
tensors, taken over the rows or columns that make a *unit* (an output unit, or an input unit
of a consumer):

    translation   Σ_k W[k, j]                         (and Σ_k b[k])          form "sum"
    scale         |W[c]|² + b[c]²                                              form "sq"
    rescale       |W1[j]|² + b1[j]² − |W2[:, j]|²                              form "sq"
    linear        (W1 W1ᵀ + b1 b1ᵀ − W2ᵀ W2)[a, b], a ≤ b                      form "gram"
                  or 1_aᵀ (W1 W1ᵀ + b1 b1ᵀ − W2ᵀ W2) 1_b over cells of units   form "gram", pool
                  or the same of stacked layers, W1 = [W_a; W_b]                form "gram", stack
    attention_qk  ([W_q|b_q][W_q|b_q]ᵀ − [W_k|b_k][W_k|b_k]ᵀ)[a, b] per head   form "gram"
    attention_vo  ([W_v|b_v][W_v|b_v]ᵀ − W_oᵀ W_o)[a, b] per head              form "gram"

A "gram" term of r units has the r(r+1)/2 components of the symmetric matrix X Xᵀ, X the
(r, k) matrix of the units' entries, in row-major upper-triangular order (0,0), (0,1), …,
(0,r−1), (1,1), …. Its diagonal is the "sq" form of the same units, so the rescale law of a
pair with no activation between is the diagonal of its linear law (both are reported: see
flowsim.laws.detection). With `pool` = p, consecutive runs of p units (a *cell*) are added
up, entry by entry, before the form: a gram term of r units then has the c(c+1)/2 components
of S Sᵀ, S = P X the (c, k) matrix of cell sums (P the c × r indicator of the c = r/p cells),
i.e. 1_aᵀ X Xᵀ 1_b. With `stack` = (offset, total, key), the term's units are units offset …
offset + r − 1 of a gram of `total` units, and the terms of one group with the same key are
the row blocks of one matrix X = [X_1; X_2; …]: its gram has the blocks' own grams on its
diagonal and the cross products X_1 X_2ᵀ off it (two Linear layers of one input whose outputs
are concatenated are one layer: [W_a; W_b][W_a; W_b]ᵀ).

A set of laws compiles to three sparse matrices (``LawSet``):

    values(θ) = A θ + B (θ ⊙ θ) + C (θ[I] ⊙ θ[J])

A holds the linear terms, B the squares (sq terms and the diagonal of gram terms) and C the
cross products θ_i θ_j, i < j, of the off-diagonal gram components, over the index pairs
(I, J). The same forms applied to a gradient give the law's *companion* (``grad_sq`` in a
record: |g_A|², |g_A1|² − |g_A2|², G_q G_qᵀ − G_k G_kᵀ) and applied to a velocity
``velocity_sq``; the discrete theory of DESIGN §5 needs nothing else. The form with every
sign made positive and every monomial replaced by its absolute value, |A| |θ| + |B| θ² +
|C| |θ[I] θ[J]|, is the law's *magnitude*, the scale its drift is measured against (for an
off-diagonal component (a, b) this is Σ_k |X_ak X_bk| ≤ |X_a| |X_b|, the Cauchy–Schwarz bound).

``gradient_check`` verifies that a law's gradient is orthogonal to the loss gradient, the
defining property ⟨∇Q(θ), ∇L(θ)⟩ = 0 that makes dQ/dt = 0 under gradient flow.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

KINDS = ("translation", "scale", "rescale", "linear", "attention_qk", "attention_vo")

#: form name -> power of the entries it multiplies: "sum" Σ x (linear), "sq" Σ x² and
#: "gram" Σ_k x_ak x_bk (quadratic)
FORMS = {"sum": 1, "sq": 2, "gram": 2}


@dataclass(frozen=True)
class Term:
    """sign · (a form) of the entries of one parameter tensor that make each unit.

    - `axis` 0 groups by output unit (rows of W, entries of b), 1 by input unit (columns).
    - `units` is the number of units (1: the whole tensor).
    - `stride`: position p along `axis` belongs to unit (p // stride) % units. None: units are
      equal consecutive blocks (a flatten after a conv makes each channel a block of input
      features; a flatten after a Linear on sequences interleaves them, stride 1).
    - `part` = (dim, start, stop): only that slice of the tensor, before grouping (one head's
      rows of a query map, the key third of ``nn.MultiheadAttention.in_proj_weight``).

    - `pool` ("gram" only): consecutive runs of `pool` units are added up, entry by entry,
      before the form: the term is the gram matrix of units // pool cell sums.
    - `stack` = (offset, total, key) ("gram" only): the term is the row block offset …
      offset + units − 1 of a gram of `total` units, with cross products against the other
      blocks of its group with the same key (their entries aligned k-th to k-th).

    Forms: "sum" Σ x and "sq" Σ x² per unit (`units` components); "gram" the matrix of
    inner products between units, Σ_k x_ak x_bk for a ≤ b (units(units+1)/2 components), or
    between cell sums (c(c+1)/2, c = units // pool), or of the stack (total(total+1)/2).
    """

    param: str
    form: str
    axis: int = 0
    units: int = 1
    sign: int = 1
    stride: int | None = None
    part: tuple[int, int, int] | None = None
    pool: int = 1
    stack: tuple[int, int, str] | None = None

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Term.form: got {self.form!r}; expected one of {', '.join(FORMS)}")
        if self.axis not in (0, 1) or self.sign not in (1, -1) or self.units < 1:
            raise ValueError(f"Term: bad axis/sign/units in {self}")
        if (self.stride is not None and self.stride < 1) or (self.part is not None and len(self.part) != 3):
            raise ValueError(f"Term: bad stride/part in {self}")
        if self.pool < 1 or self.units % self.pool or (self.pool > 1 and self.form != "gram"):
            raise ValueError(f"Term: bad pool in {self} (a divisor of units, for a gram form only)")
        if self.stack is not None and (
            len(self.stack) != 3 or self.form != "gram" or self.pool != 1 or not 0 <= self.stack[0] <= self.stack[1] - self.units
        ):
            raise ValueError(f"Term: bad stack in {self} ((offset, total, key) inside the total, for a gram form only)")

    @property
    def cells(self) -> int:
        """The units of the gram matrix: its stack's total, or units // pool."""
        return self.stack[1] if self.stack is not None else self.units // self.pool

    @property
    def size(self) -> int:
        """The number of components the term contributes to."""
        return self.cells * (self.cells + 1) // 2 if self.form == "gram" else self.units

    def entries(self, shape: torch.Size) -> Tensor:
        """(units, k): the flat indices, within the tensor, of the entries of each unit; the
        k-th entries of two units sit at the same place along every other axis."""
        index = torch.arange(math.prod(shape)).reshape(shape)
        if self.part is not None:
            dim, start, stop = self.part
            index = index.narrow(dim, start, stop - start)
        index = index.reshape(-1) if index.ndim == 0 else index.movedim(self.axis, 0)
        n = index.shape[0]
        stride = self.stride if self.stride is not None else n // self.units
        if stride == 0 or n % (self.units * stride):
            raise ValueError(f"Term {self.param}: {n} entries along axis {self.axis} do not make {self.units} units of stride {stride}")
        return index.reshape(n // (self.units * stride), self.units, stride, -1).transpose(0, 1).reshape(self.units, -1)


@dataclass(frozen=True)
class Law:
    """Conserved quantities of one site: its components are its groups' components, in order;
    each group is the sum of its terms (the terms of a group share their form and units).

    `exact` is False where a known term (normalisation eps) breaks the symmetry slightly; `eps`
    then says how much.
    """

    kind: str
    site: str
    groups: tuple[tuple[Term, ...], ...]
    components: tuple[str, ...]
    exact: bool = True
    eps: float = 0.0
    degree: int = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Law.kind: got {self.kind!r}; expected one of {', '.join(KINDS)}")
        degrees = {FORMS[t.form] for g in self.groups for t in g}
        if len(degrees) != 1:
            raise ValueError(f"Law {self.site}: mixes linear and quadratic terms")
        shapes = [len({(t.form, t.size) for t in g}) for g in self.groups]
        if any(s != 1 for s in shapes) or sum(g[0].size for g in self.groups) != len(self.components):
            raise ValueError(f"Law {self.site}: component labels do not match the terms' units")
        object.__setattr__(self, "degree", degrees.pop())

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.param for g in self.groups for t in g))

    @property
    def size(self) -> int:
        return len(self.components)

    def _alone(self, params: Mapping[str, Tensor]) -> tuple[LawSet, Tensor]:
        names = self.parameters
        theta = torch.cat([params[n].reshape(-1) for n in names])
        return LawSet([self], names, [params[n].shape for n in names]), theta

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """The law's components at `params` (a name → tensor mapping); shape (size,)."""
        law_set, theta = self._alone(params)
        return law_set.value(theta)

    def magnitude(self, params: Mapping[str, Tensor]) -> Tensor:
        """Σ |monomial| per component: what relative drift is measured against."""
        law_set, theta = self._alone(params)
        return law_set.magnitude(theta)

    def labels(self) -> list[str]:
        return [f"{self.kind}:{self.site}:{c}" for c in self.components]


def gram_labels(units: int, prefix: str = "") -> list[str]:
    """Component labels of a gram term, "(a,b)" for a ≤ b in its row-major order."""
    rows, cols = torch.triu_indices(units, units)
    return [f"{prefix}({a},{b})" for a, b in zip(rows.tolist(), cols.tolist())]


class LawSet:
    """Many laws on one flat parameter vector θ, compiled to three sparse matrices:

        values(θ) = A θ + B (θ ⊙ θ) + C (θ[I] ⊙ θ[J])

    A (Q × P) holds the signs of the linear terms, B (Q × P) of the squares, C (Q × n_pairs)
    of the cross products θ_i θ_j over the index pairs (I, J), i < j, each row one component.
    Evaluating every law is then three sparse matrix-vector products, on any θ-like vector (a
    gradient gives ``grad_sq``, a velocity ``velocity_sq``) or a (P, K) matrix of them.
    ``rows`` evaluates the rows of an (R, P) matrix, by dense reductions of parameter views
    where every term allows (what the recorder calls at every save point).
    """

    def __init__(self, laws: Sequence[Law], names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
        self.laws = tuple(laws)
        self.size = sum(law.size for law in self.laws)
        self.n_params = sum(math.prod(s) for s in shapes)
        offsets = dict(zip(names, itertools.accumulate([0, *(math.prod(s) for s in shapes)])))
        shape_of = dict(zip(names, shapes))
        parts: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {k: ([], [], []) for k in ("linear", "square", "cross")}

        def add(kind: str, rows: Tensor, cols: Tensor, sign: int) -> None:
            parts[kind][0].append(rows)
            parts[kind][1].append(cols)
            parts[kind][2].append(torch.full((rows.shape[0],), float(sign)))

        row = 0
        for law in self.laws:
            for group in law.groups:
                stacked: list[tuple[Term, Tensor]] = []
                if group[0].form == "gram":
                    n = group[0].cells
                    component = torch.full((n, n), -1, dtype=torch.long)  # (a, b), a ≤ b → its row
                    a, b = torch.triu_indices(n, n)
                    component[a, b] = row + torch.arange(len(a))
                for term in group:
                    if term.param not in offsets:
                        raise KeyError(f"law {law.site!r} uses parameter {term.param!r}, which is not in θ")
                    entries = term.entries(shape_of[term.param]) + offsets[term.param]
                    k = entries.shape[1]
                    if term.form != "gram":
                        rows = torch.arange(row, row + term.units).repeat_interleave(k)
                        add("linear" if term.form == "sum" else "square", rows, entries.reshape(-1), term.sign)
                        continue
                    # component (a, b) = Σ_k (Σ_{i∈a} x_ik)(Σ_{j∈b} x_jk): every unit pair (i, j) of
                    # the two cells, a square where i = j, else a cross product (twice where a = b)
                    offset = term.stack[0] if term.stack is not None else 0
                    cells = entries.reshape(term.units // term.pool, term.pool, k)
                    a, b = torch.triu_indices(len(cells), len(cells))
                    p = term.pool
                    first = cells[a][:, :, None, :].expand(-1, p, p, k).reshape(-1)
                    second = cells[b][:, None, :, :].expand(-1, p, p, k).reshape(-1)
                    rows = component[offset + a, offset + b].repeat_interleave(p * p * k)
                    diagonal = first == second
                    add("square", rows[diagonal], first[diagonal], term.sign)
                    add("cross", rows[~diagonal], torch.stack([first[~diagonal], second[~diagonal]]), term.sign)
                    if term.stack is not None:
                        # the cross products with the blocks of the same key before it
                        for other, before in stacked:
                            if other.stack[2] != term.stack[2]:
                                continue
                            if other.sign != term.sign or before.shape[1] != k:
                                raise ValueError(f"law {law.site!r}: stacked blocks {other.param} and {term.param} do not align")
                            i, j = (u.reshape(-1) for u in torch.meshgrid(torch.arange(other.units), torch.arange(term.units), indexing="ij"))
                            low, high = torch.minimum(other.stack[0] + i, offset + j), torch.maximum(other.stack[0] + i, offset + j)
                            pairs = torch.stack([before[i].reshape(-1), entries[j].reshape(-1)])
                            add("cross", component[low, high].repeat_interleave(k), pairs, term.sign)
                        stacked.append((term, entries))
                row += group[0].size
        shape = (self.size, self.n_params)
        self._coo = {kind: _coo(parts[kind][0], parts[kind][1], parts[kind][2], shape) for kind in ("linear", "square")}
        self._coo["cross"], self._pairs = _cross(parts["cross"], self.size, self.n_params)
        self._reductions = _reductions(self.laws, offsets, shape_of)
        self._scratch: Tensor | None = None  # rows' squares, reused from one call to the next
        self._compiled: dict[tuple[torch.dtype, torch.device, bool], tuple[Tensor, Tensor, Tensor | None, Tensor]] = {}

    def _matrices(self, like: Tensor, absolute: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(A, B, C or None when there are no cross terms, the (2, n_pairs) pair indices) on
        `like`'s dtype and device; with `absolute`, |A|, |B|, |C|."""
        key = (like.dtype, like.device, absolute)
        if key not in self._compiled:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
                warnings.simplefilter("ignore", UserWarning)
                linear, square, cross = (
                    _csr_int32((m.abs() if absolute else m).to(dtype=like.dtype, device=like.device))
                    for m in (self._coo["linear"], self._coo["square"], self._coo["cross"])
                )
            self._compiled[key] = (linear, square, cross if self._pairs.shape[1] else None, self._pairs.to(like.device))
        return self._compiled[key]

    def value(self, theta: Tensor) -> Tensor:
        """All components at θ (P,) → (Q,), or at the columns of a (P, K) matrix → (Q, K)."""
        theta = theta.contiguous()  # a sparse CSR product with a strided view is ~4× slower
        linear, square, cross, (i, j) = self._matrices(theta)
        out = linear @ theta + square @ (theta * theta)
        return out if cross is None else out + cross @ (theta[i] * theta[j])

    def rows(self, vectors: Tensor) -> Tensor:
        """All components at each row of an (R, P) matrix of θ-like vectors → (R, Q).

        Where every term is a plain sum or sum of squares over the units of a parameter tensor
        (no gram form, no slice: the MLP and CNN laws), each term is a reduction of a view of
        the rows, Σ over the other axes of (X or X²)[:, start:stop] viewed as the tensor: dense
        reductions that read nothing but the rows. Otherwise the sparse matrices."""
        if self._reductions is None:
            return self.value(vectors.T).T
        vectors = vectors.contiguous()
        scratch = self._scratch
        if scratch is None or scratch.shape != vectors.shape or scratch.dtype != vectors.dtype or scratch.device != vectors.device:
            scratch = self._scratch = torch.empty_like(vectors)
        squares = torch.mul(vectors, vectors, out=scratch)  # reused: a fresh (R, P) block costs its page faults
        n_rows, n_params = vectors.shape
        pieces = []
        for group in self._reductions:
            total = None
            for term in group:  # one view op per term (a slice and a view cost two)
                base = squares if term.square else vectors
                part = base.as_strided((n_rows, *term.shape), (n_params, *term.strides), base.storage_offset() + term.start)
                part = part.sum(term.dims) if term.dims else part
                if total is None:
                    total = part if term.sign > 0 else -part
                else:
                    total = total + part if term.sign > 0 else total - part
            pieces.append(total)
        return torch.cat(pieces, dim=1) if pieces else vectors.new_zeros(vectors.shape[0], 0)

    def magnitude(self, theta: Tensor) -> Tensor:
        """Σ |monomial| per component, |A| |θ| + |B| θ² + |C| |θ[I] θ[J]|: what relative drift
        is measured against."""
        linear, square, cross, (i, j) = self._matrices(theta, absolute=True)
        out = linear @ theta.abs() + square @ (theta * theta)
        return out if cross is None else out + cross @ (theta[i] * theta[j]).abs()

    def jacobian(self, theta: Tensor) -> Tensor:
        """∂ values / ∂θ = A + 2 B diag(θ) + C (diag(θ[J]) E_I + diag(θ[I]) E_J), dense (Q, P),
        E_I the rows of the identity picked by I."""
        jac = self._coo["linear"].to(theta).to_dense() + 2 * self._coo["square"].to(theta).to_dense() * theta
        if self._pairs.shape[1]:
            cross = self._coo["cross"].to(theta).to_dense()
            i, j = self._pairs.to(theta.device)
            jac.index_add_(1, i, cross * theta[j])
            jac.index_add_(1, j, cross * theta[i])
        return jac.to(theta.dtype)

    def coords(self) -> dict[str, list]:
        """Per-component labels for the record's `quantity` dimension."""
        out: dict[str, list] = {"quantity": [], "law": [], "site": [], "component": [], "exact": []}
        for law in self.laws:
            out["quantity"] += law.labels()
            out["law"] += [law.kind] * law.size
            out["site"] += [law.site] * law.size
            out["component"] += list(law.components)
            out["exact"] += [law.exact] * law.size
        return out


@dataclass(frozen=True)
class _Reduction:
    """A term as sign · Σ over `dims` of (X or X²)[:, start:stop].view(R, *shape): `shape` is
    the parameter's with its unit axis split as (blocks, units, stride) (``Term.stride``: the
    position p along the axis is in unit (p // stride) % units), so that the result is (R, units).
    `strides` are the contiguous strides of `shape`."""

    square: bool
    start: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dims: tuple[int, ...]
    sign: int


def _reductions(
    laws: Sequence[Law], offsets: Mapping[str, int], shape_of: Mapping[str, torch.Size]
) -> list[list[_Reduction]] | None:
    """Every group of every law as reductions of parameter views (``LawSet.rows``), or None if
    a term is not a plain reduction (a gram form or a `part` slice)."""
    plan = []
    for law in laws:
        for group in law.groups:
            terms = []
            for term in group:
                if term.form == "gram" or term.part is not None:
                    return None
                shape = tuple(shape_of[term.param]) or (1,)
                axis, n = term.axis, shape[term.axis]
                stride = term.stride if term.stride is not None else n // term.units
                split = (*shape[:axis], n // (term.units * stride), term.units, stride, *shape[axis + 1 :])
                unit = axis + 1  # the units' place in `split`; axes of length 1 go (faster reductions)
                kept = [i for i, size in enumerate(split) if size > 1 or i == unit]
                dims = tuple(1 + kept.index(i) for i in kept if i != unit)
                start = offsets[term.param]
                shape_kept = tuple(split[i] for i in kept)
                strides = tuple(math.prod(shape_kept[i + 1 :]) for i in range(len(shape_kept)))
                terms.append(_Reduction(term.form == "sq", start, shape_kept, strides, dims, term.sign))
            plan.append(terms)
    return plan


def _csr_int32(matrix: Tensor) -> Tensor:
    """`matrix` in CSR with 32-bit indices, which the sparse BLAS takes as they are (torch's
    default 64-bit ones measured slower in its products)."""
    csr = matrix.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)


def _coo(rows: list[Tensor], cols: list[Tensor], values: list[Tensor], shape: tuple[int, int]) -> Tensor:
    if not rows:
        return torch.sparse_coo_tensor(
            torch.zeros((2, 0), dtype=torch.long), torch.zeros(0, dtype=torch.float64), shape, check_invariants=True
        ).coalesce()
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(values).double(), shape, check_invariants=True).coalesce()


def _cross(parts: tuple[list[Tensor], list[Tensor], list[Tensor]], size: int, n_params: int) -> tuple[Tensor, Tensor]:
    """C (Q × n_pairs, COO) and the (2, n_pairs) index pairs (i < j) of the cross terms."""
    rows, pairs, signs = parts
    if not rows:
        return _coo([], [], [], (size, 0)), torch.zeros((2, 0), dtype=torch.long)
    pairs = torch.cat(pairs, dim=1)
    if (pairs[0] == pairs[1]).any():
        raise ValueError("a gram term puts one parameter entry in two units")
    low, high = pairs.min(0).values, pairs.max(0).values
    unique, column = torch.unique(low * n_params + high, return_inverse=True)
    return _coo([torch.cat(rows)], [column], [torch.cat(signs)], (size, len(unique))), torch.stack([unique // n_params, unique % n_params])


def gradient_check(laws: Sequence[Law], problem, theta: Tensor | None = None) -> Tensor:
    """|⟨∇Q_c, ∇L⟩| / (|∇Q_c| |∇L|) for every law component c, at `theta` (the problem's
    current parameters by default), with L the data loss on all examples. Round-off level
    (≈1e-15 in float64) for an exact law; shape (n_components,)."""
    theta = problem.initial_theta() if theta is None else theta
    _, grad = problem.loss_and_grad(theta)
    jac = LawSet(laws, problem.names, problem.shapes).jacobian(theta)
    denom = jac.norm(dim=1) * grad.norm()
    return (jac @ grad).abs() / denom.clamp_min(torch.finfo(theta.dtype).tiny)
