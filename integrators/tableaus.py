"""Butcher tableaus of the explicit Runge–Kutta methods RK runs: torchdiffeq's adaptive methods
(its own coefficients, read off its solver classes) and its fixed-step ones, written out."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ode import TORCHDIFFEQ

@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method::

        c_0 = 0  |
        c_1      | a_10
        c_2      | a_20  a_21
        ⋮        | ⋮            ⋱
        c_{s-1}  | a_{s-1,0}   …   a_{s-1,s-2}
        ---------+-------------------------------
                 | b_0   b_1   …   b_{s-1}        (the solution)
                 | e_0   e_1   …   e_{s-1}        (error weights b − b̂; None: fixed steps)
                 | m_0   m_1   …   m_{s-1}        (y(t0 + h/2) for dense output; None: linear)

    `order` is the exponent of the step-size control (torchdiffeq's ``order``). Checked on
    construction: each row of a sums to its c, b sums to 1, e to 0 and m to 1/2.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None = None
    b_mid: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        s = len(self.c)
        if s == 0 or self.c[0] != 0 or len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau {self.name}: expected c (with c_0 = 0), a and b of one length s, got {self}")
        for i, (c_i, row) in enumerate(zip(self.c, self.a)):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a has {len(row)} entries; expected {i} (explicit method)")
            if abs(math.fsum(row) - c_i) > 1e-12:
                raise ValueError(f"tableau {self.name}: row {i} of a sums to {math.fsum(row)!r}; expected c_{i} = {c_i!r}")
        for weights, total, label in ((self.b, 1.0, "b"), (self.b_error, 0.0, "b_error"), (self.b_mid, 0.5, "b_mid")):
            if weights is None:
                continue
            if len(weights) != s:
                raise ValueError(f"tableau {self.name}: {label} has {len(weights)} entries; expected {s}")
            if abs(math.fsum(weights) - total) > 1e-12:
                raise ValueError(f"tableau {self.name}: {label} sums to {math.fsum(weights)!r}; expected {total}")
        if self.b_mid is not None and self.b_error is None:
            raise ValueError(f"tableau {self.name}: b_mid (dense output) is only used with b_error (adaptive steps)")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at y1, so it is the next step's k_0."""
        return self.stages > 1 and self.c[-1] == 1 and self.a[-1] == self.b[:-1] and self.b[-1] == 0

    @classmethod
    def from_torchdiffeq(cls, name: str) -> ButcherTableau:
        """torchdiffeq's own coefficients for its adaptive method `name` (dopri5, dopri8, …),
        read through its adapter (integrators.ode.Torchdiffeq)."""
        t = TORCHDIFFEQ.tableau(name)
        return cls(
            name=name,
            order=t["order"],
            c=(0.0, *t["alpha"]),
            a=((), *(tuple(row) for row in t["beta"])),
            b=tuple(t["c_sol"]),
            b_error=tuple(t["c_error"]),
            b_mid=tuple(t["mid"]),
        )


def _fixed(name: str, order: int, c: tuple, a: tuple, b: tuple) -> ButcherTableau:
    return ButcherTableau(name, order, tuple(map(float, c)), tuple(tuple(map(float, r)) for r in a), tuple(map(float, b)))


#: every method RK runs: torchdiffeq's explicit adaptive RK methods (its coefficients) and its
#: fixed-step ones (written out; "rk4" is torchdiffeq's, the 3/8 rule)
TABLEAUS: dict[str, ButcherTableau] = {
    **{name: ButcherTableau.from_torchdiffeq(name) for name in TORCHDIFFEQ.runge_kutta},
    "euler": _fixed("euler", 1, (0,), ((),), (1,)),
    "midpoint": _fixed("midpoint", 2, (0, 1 / 2), ((), (1 / 2,)), (0, 1)),
    "heun2": _fixed("heun2", 2, (0, 1), ((), (1,)), (1 / 2, 1 / 2)),
    "heun3": _fixed("heun3", 3, (0, 1 / 3, 2 / 3), ((), (1 / 3,), (0, 2 / 3)), (1 / 4, 0, 3 / 4)),
    "rk4": _fixed("rk4", 4, (0, 1 / 3, 2 / 3, 1), ((), (1 / 3,), (-1 / 3, 1), (1, -1, 1)), (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}


__all__ = ["ButcherTableau", "TABLEAUS"]
