"""Law: a quantity that a symmetry of the loss conserves under gradient flow.

A law is a vector of components, each a signed sum of simple forms of one site's parameter
tensors (a linear sum or a sum of squares, over the rows or columns that make a unit):

    translation   Σ_k W[k, j]                         (and Σ_k b[k])
    scale         |W[c]|² + b[c]²
    rescale       |W1[j]|² + b1[j]² − |W2[:, j]|²

A set of laws compiles to two sparse matrices, values = A θ + B θ² (``LawSet``). The same
forms applied to a gradient give the law's *companion* (``grad_sq`` in a record,
|g_A|² or |g_A1|² − |g_A2|²) and applied to a velocity ``velocity_sq``; the discrete theory of
DESIGN §5 needs nothing else. The form with every sign made positive and every sum made a sum
of absolute values is the law's *magnitude*, the scale its drift is measured against.

``detect(model)`` finds the laws of a network (flowsim.symmetry); ``gradient_check`` verifies
that a law's gradient is orthogonal to the loss gradient, the defining property
⟨∇Q(θ), ∇L(θ)⟩ = 0 that makes dQ/dt = 0 under gradient flow.
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


def _units_view(x: Tensor, axis: int, units: int) -> Tensor:
    """`x` as (units, rest): axis 0 = output units, axis 1 = input units (in blocks)."""
    if axis == 0:
        return x.reshape(units, -1)
    # input units: W is (out, in, ...); a flatten before a Linear makes each unit a block of
    # consecutive input features, so (out, units, block·rest) groups them
    return x.reshape(x.shape[0], units, -1).transpose(0, 1).reshape(units, -1)


#: form name -> power of the entries it sums: "sum" Σ x (linear), "sq" Σ x² (quadratic)
FORMS = {"sum": 1, "sq": 2}


@dataclass(frozen=True)
class Term:
    """sign · Σ x^power over the entries of one parameter tensor that make each unit; `axis` 0
    groups by output unit (rows), 1 by input unit (columns, in equal blocks after a flatten);
    `units` is the number of units (1: the whole tensor)."""

    param: str
    form: str
    axis: int = 0
    units: int = 1
    sign: int = 1

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Term.form: got {self.form!r}; expected one of {', '.join(FORMS)}")
        if self.axis not in (0, 1) or self.sign not in (1, -1) or self.units < 1:
            raise ValueError(f"Term: bad axis/sign/units in {self}")

    def entries(self, shape: torch.Size) -> Tensor:
        """(units, k): the flat indices, within the tensor, of the entries of each unit."""
        return _units_view(torch.arange(math.prod(shape)).reshape(shape), self.axis, self.units)


@dataclass(frozen=True)
class Law:
    """Conserved quantities of one site: its components are its groups' units, in order; each
    group is the sum of its terms (all terms of a group have the same number of units).

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
        sizes = [len({t.units for t in g}) for g in self.groups]
        if any(s != 1 for s in sizes) or sum(g[0].units for g in self.groups) != len(self.components):
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
        """Σ |term| per component: what relative drift is measured against."""
        law_set, theta = self._alone(params)
        return law_set.magnitude(theta)

    def labels(self) -> list[str]:
        return [f"{self.kind}:{self.site}:{c}" for c in self.components]


class LawSet:
    """Many laws on one flat parameter vector θ, compiled to two sparse (Q × P) matrices:

        values(θ) = A θ + B (θ ⊙ θ)

    A holds the signs of the linear terms, B of the quadratic ones, each row one component.
    Evaluating every law is then two sparse matrix-vector products, on any θ-like vector (a
    gradient gives ``grad_sq``, a velocity ``velocity_sq``) or a (P, K) matrix of them.
    """

    def __init__(self, laws: Sequence[Law], names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
        self.laws = tuple(laws)
        self.size = sum(law.size for law in self.laws)
        self.n_params = sum(math.prod(s) for s in shapes)
        offsets = dict(zip(names, itertools.accumulate([0, *(math.prod(s) for s in shapes)])))
        shape_of = dict(zip(names, shapes))
        rows = {1: [], 2: []}
        cols = {1: [], 2: []}
        signs = {1: [], 2: []}
        row = 0
        for law in self.laws:
            for group in law.groups:
                for term in group:
                    if term.param not in offsets:
                        raise KeyError(f"law {law.site!r} uses parameter {term.param!r}, which is not in θ")
                    entries = term.entries(shape_of[term.param]) + offsets[term.param]
                    power = FORMS[term.form]
                    rows[power].append(torch.arange(row, row + term.units).repeat_interleave(entries.shape[1]))
                    cols[power].append(entries.reshape(-1))
                    signs[power].append(torch.full((entries.numel(),), float(term.sign)))
                row += group[0].units
        self._coo = {p: _coo(rows[p], cols[p], signs[p], (self.size, self.n_params)) for p in (1, 2)}
        self._compiled: dict[tuple[torch.dtype, torch.device, bool], tuple[Tensor, Tensor]] = {}

    def _matrices(self, like: Tensor, absolute: bool = False) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device, absolute)
        if key not in self._compiled:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
                warnings.simplefilter("ignore", UserWarning)
                self._compiled[key] = tuple(
                    (m.abs() if absolute else m).to(dtype=like.dtype, device=like.device).to_sparse_csr()
                    for m in (self._coo[1], self._coo[2])
                )
        return self._compiled[key]

    def value(self, theta: Tensor) -> Tensor:
        """All components at θ (P,) → (Q,), or at the columns of a (P, K) matrix → (Q, K)."""
        linear, quadratic = self._matrices(theta)
        return linear @ theta + quadratic @ (theta * theta)

    def magnitude(self, theta: Tensor) -> Tensor:
        """Σ |term| per component, |A| |θ| + |B| θ²: what relative drift is measured against."""
        linear, quadratic = self._matrices(theta, absolute=True)
        return linear @ theta.abs() + quadratic @ (theta * theta)

    def jacobian(self, theta: Tensor) -> Tensor:
        """∂ values / ∂θ = A + 2 B diag(θ), dense (Q, P)."""
        return (self._coo[1].to(theta).to_dense() + 2 * self._coo[2].to(theta).to_dense() * theta).to(theta.dtype)

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


def _coo(rows: list[Tensor], cols: list[Tensor], values: list[Tensor], shape: tuple[int, int]) -> Tensor:
    if not rows:
        return torch.sparse_coo_tensor(
            torch.zeros((2, 0), dtype=torch.long), torch.zeros(0, dtype=torch.float64), shape, check_invariants=True
        ).coalesce()
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(values).double(), shape, check_invariants=True).coalesce()


def detect(model: torch.nn.Module, loss: str = "cross_entropy") -> list[Law]:
    """The conservation laws of `model`'s symmetries under the given loss (see flowsim.symmetry)."""
    from .symmetry import detect_laws

    return detect_laws(model, loss=loss)


def gradient_check(laws: Sequence[Law], problem, theta: Tensor | None = None) -> Tensor:
    """|⟨∇Q_c, ∇L⟩| / (|∇Q_c| |∇L|) for every law component c, at `theta` (the problem's
    current parameters by default), with L the data loss on all examples. Round-off level
    (≈1e-15 in float64) for an exact law; shape (n_components,)."""
    theta = problem.initial_theta() if theta is None else theta
    _, grad = problem.loss_and_grad(theta)
    jac = LawSet(laws, problem.names, problem.shapes).jacobian(theta)
    denom = jac.norm(dim=1) * grad.norm()
    return (jac @ grad).abs() / denom.clamp_min(torch.finfo(theta.dtype).tiny)
