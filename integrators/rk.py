"""Explicit Runge–Kutta methods fused on one stage buffer: torchdiffeq's tableaus
(integrators.tableaus) and step-size control, without its per-step overheads.

One step of an s-stage method from (t0, y0) with size h:

    k_0 = f(t0, y0)                                    (FSAL: the last stage of the step before)
    k_i = f(t0 + c_i h, y0 + h Σ_{j<i} a_ij k_j)        i = 1 … s−1
    y1  = y0 + h Σ_j b_j k_j          error  e = h Σ_j (b_j − b̂_j) k_j

The k_i are the rows of one preallocated (rows, P) tensor K, so every stage input, y1 and e is
one matrix–vector product Kᵀ a written into a preallocated buffer (``torch.addmv(out=...)``):
no tensor is allocated per step. A method whose last stage is evaluated at y1 (FSAL: dopri5,
dopri8, bosh3) reuses it as the next k_0.

Step-size control is torchdiffeq's (``integrators.control.StepSizeController``):

    r = rms(e / (atol + rtol·max(|y0|, |y1|)));   accept when r ≤ 1
    h ← h · min(ifactor, max(safety · r^(−1/order), dfactor))    (dfactor → 1 when r < 1; h·ifactor when r = 0)

with torchdiffeq's initial step (Hairer's, in the term's error norm as torchdiffeq's ODE takes
it; read through integrators.ode.Torchdiffeq). Save points come from torchdiffeq's dense output,
the quartic through y0, y1, y(t0 + h/2), f0 and f1; written in the stages it is
y(t0 + x h) = y0 + h Kᵀ w(x), one product per save point and nothing per step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from flowsim.errors import ConfigError, bad_value, check_field
from flowsim.terms import VectorField

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step, not_finite, step_size_underflow, too_many_steps
from .control import StepSizeController
from .ode import TORCHDIFFEQ, check_rtol
from .tableaus import TABLEAUS, ButcherTableau

# ----------------------------------------------------------------------------------------- the integrator


@dataclass(frozen=True)
class RK(Integrator):
    """Explicit Runge–Kutta on a continuous dynamics, fused: the same methods, steps and save
    points as ``ODE(method, rtol, atol)`` (torchdiffeq), at less cost per evaluation.

    **Main arguments**

    - `method`: adaptive dopri5, dopri8, bosh3, fehlberg2, adaptive_heun; fixed-step euler,
      midpoint, heun2, heun3, rk4.
    - `rtol`, `atol`: local error control, |e| ≲ atol + rtol·|y| (adaptive methods).
    - `step_size`: fixed-step methods only; None takes one step per save interval.

    **Other arguments**

    - `first_step`: the first step size (None: torchdiffeq's selection).
    - `max_steps`: give up (IntegrationError) after this many steps, accepted or rejected, in
      the whole run (torchdiffeq's ``max_num_steps`` counts per save interval). None: no limit.
    - `safety`, `ifactor`, `dfactor`: the step-size controller's (torchdiffeq's defaults).
    - `compile`: evaluate the full-batch gradients through one compiled forward and backward
      graph (``Problem.compiled_gradient``: make_fx and TorchInductor). True compiles before
      the first step (falling back, with a warning, to the eager evaluation when tracing or
      compilation fails); False never compiles; "auto" lets the library decide once, before
      the first step, from the inputs alone (``RK.settle``: it compiles a CPU solve whose
      estimated work reaches ``AUTO_COMPILE_FLOPS``, falling back silently). The record's
      ``integrator`` attr says what was decided (``compiled``, ``compile_reason``) and a
      resumed run keeps it.
    - `sync_every`: adaptive methods only. None: each accept/reject decision is taken on the
      host (one synchronisation per step on a GPU). An integer n: the step-size control runs on
      the device (``_DeviceLoop``) and the host reads the state once per chunk of at most n
      attempts; the same steps, evaluations and states as the host loop.
    - `cuda_graph`: with `sync_every`, on CUDA: one attempt (its stages, error estimate and
      step-size update) is captured as a CUDA graph and replayed, one launch per attempt
      (falls back, with a warning, to launching its kernels when capture fails).

    **Raises** ConfigError for bad arguments; while solving, IntegrationError when the state
    becomes NaN/Inf, the step size underflows or `max_steps` is reached.
    """

    method: str = "dopri5"
    rtol: float = 1e-7
    atol: float = 1e-9
    step_size: float | None = None
    first_step: float | None = None
    max_steps: int | None = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    compile: bool | str = "auto"
    sync_every: int | None = None
    cuda_graph: bool = False
    term: ClassVar[type[VectorField]] = VectorField
    #: how `compile` was decided for one run (``settle``); None on an integrator not yet settled
    decision: ClassVar[CompileDecision | None] = None

    def __post_init__(self) -> None:
        if self.method not in TABLEAUS:
            raise bad_value("integrator.method", self.method, f"one of {', '.join(TABLEAUS)}")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        adaptive = self.tableau.adaptive
        fixed = ", ".join(m for m, t in TABLEAUS.items() if not t.adaptive)
        for name in ("step_size", "first_step"):
            if getattr(self, name) is not None:
                check_field(self, "integrator", name, minimum=0.0, exclusive_minimum=True)
        if self.step_size is not None and adaptive:
            raise ConfigError(f"integrator.step_size: {self.method} chooses its own steps; give step_size only to {fixed}")
        if self.first_step is not None and not adaptive:
            raise ConfigError(f"integrator.first_step: {self.method} takes fixed steps; give it step_size instead")
        if self.max_steps is not None:
            check_field(self, "integrator", "max_steps", integer=True, minimum=1)
        check_field(self, "integrator", "safety", minimum=0.0, maximum=1.0, exclusive_minimum=True)
        check_field(self, "integrator", "ifactor", minimum=1.0)
        check_field(self, "integrator", "dfactor", minimum=0.0, maximum=1.0, exclusive_minimum=True)
        if not isinstance(self.compile, bool) and not (isinstance(self.compile, str) and self.compile == "auto"):
            raise bad_value("integrator.compile", self.compile, 'true, false or "auto"')
        if not isinstance(self.cuda_graph, bool):
            raise bad_value("integrator.cuda_graph", self.cuda_graph, "true or false")
        if self.sync_every is not None:
            check_field(self, "integrator", "sync_every", integer=True, minimum=1)
            if not adaptive:
                raise ConfigError(f"integrator.sync_every: {self.method} takes fixed steps and never waits for the host; leave it None")
        if self.cuda_graph and self.sync_every is None:
            raise ConfigError("integrator.cuda_graph: a graph holds one attempt with its step-size control on the device; give sync_every too")

    def check_device(self, device: torch.device) -> None:
        if self.cuda_graph and device.type != "cuda":
            raise ConfigError(f"integrator.cuda_graph: CUDA graphs run on device='cuda', not {str(device)!r}; set cuda_graph=False")

    def check_grid(self, grid: SaveGrid) -> None:
        why = "save points inside a longer step are linear interpolations of it"
        check_fixed_step("integrator.step_size", self.step_size, grid, why)

    @property
    def tableau(self) -> ButcherTableau:
        return TABLEAUS[self.method]

    @property
    def order(self) -> int:
        return self.tableau.order

    def check_dtype(self, dtype: torch.dtype) -> None:
        if self.tableau.adaptive:
            check_rtol(self.rtol, dtype)

    def describe(self) -> dict[str, Any]:
        """Its arguments; once settled (``settle``), with how `compile` was decided for the run:
        ``compiled`` (whether it evaluates the compiled field) and ``compile_reason``."""
        described = super().describe()
        if self.decision is not None:
            described.update(compiled=self.decision.compiled, compile_reason=self.decision.reason)
        return described

    def settle(self, term: VectorField, grid: SaveGrid, start: dict[str, Any] | None = None) -> RK:
        """This integrator with `compile` decided for one run, once, before the first step, from
        the inputs alone (never from timing): False stays eager; True compiles now (a failure
        warns, and the run is eager); "auto" compiles now where ``auto_compile`` says it pays
        (a failure is silent). A resumed run (`start`, a checkpoint of ``solve``) takes the
        decision its checkpoint holds, so it evaluates the same field as the run it continues."""
        if start is not None and "compiled" in start:
            decision = CompileDecision(bool(start["compiled"]), str(start["compile_reason"]))
            if decision.compiled:  # a new process: compile again (the graph is cached per process)
                decision = _compile_now(term, grid.times[0], decision.reason, quiet=False)
        elif self.compile is True:
            decision = _compile_now(term, grid.times[0], "compile=True", quiet=False)
        elif self.compile is False:
            decision = CompileDecision(False, "compile=False")
        else:
            decision = self.auto_compile(term, grid)
        settled = dataclasses.replace(self)
        object.__setattr__(settled, "decision", decision)  # not a field: no argument, no part of the fingerprint
        return settled

    def auto_compile(self, term: VectorField, grid: SaveGrid) -> CompileDecision:
        """compile="auto": compile (now) when the eager solve's estimated work (``work_estimate``)
        reaches AUTO_COMPILE_FLOPS, on the CPU, for a term with a compiled field and no members;
        where compiling falls back (a model that cannot be traced, a chunked problem) the run is
        eager and the decision says why, without a warning."""
        if term.members is not None:
            dim, k = term.members
            return CompileDecision(False, f"auto: the {k} members ({dim}) evaluate their gradients batched, not compiled")
        if term.compiled is None:
            return CompileDecision(False, "auto; not compiled: the dynamics gives no compiled field")
        if term.y0.device.type != "cpu":
            where = term.y0.device.type
            return CompileDecision(False, f"auto: compiles on the CPU only, where AUTO_COMPILE_FLOPS is calibrated; give compile=True on {where}")
        work = self.work_estimate(term, grid)
        why = f"auto: estimated work {work:.3g} flops"
        if not work >= AUTO_COMPILE_FLOPS:  # NaN (a non-finite first evaluation): eager, and the loop says what failed
            return CompileDecision(False, f"{why} < {AUTO_COMPILE_FLOPS:.3g}")
        return _compile_now(term, grid.times[0], f"{why} >= {AUTO_COMPILE_FLOPS:.3g}", quiet=True)

    def work_estimate(self, term: VectorField, grid: SaveGrid) -> float:
        """The flops of the eager solve, estimated before it: W = F·n, F the flops of one
        evaluation of the field at (t0, y0) (its matrix products and convolutions, forward and
        backward, by torch's flop formulas: ``ProductFlops``) and n the evaluations: s per step for
        a fixed-step method (exact), and for an adaptive one s'·(t1 − t0)/h + 2 with h the first
        step the loop would take (``first_step``, or torchdiffeq's selection from f(t0, y0) and
        one more evaluation) and s' its evaluations per step (s − 1 with FSAL, else s). Where
        the steps grow after the first, n is high (1.15–3.3× on the benchmark MLP, ReLU, at
        rtol 1e-6 … 1e-7). Two evaluations of the field, not counted in ``nfe``; the term's
        memory is left as it was, so the run is the one compile=False takes."""
        tab, times = self.tableau, grid.times
        t0 = torch.tensor(times[0], dtype=torch.float64)
        memory = term.memory.state() if term.memory is not None else None
        with ProductFlops() as counter:
            f0 = term.f(t0, term.y0)
        flops = counter.total
        if not tab.adaptive:
            steps = len(times) - 1 if self.step_size is None else math.ceil((times[-1] - times[0]) / self.step_size)
            evaluations = tab.stages * steps
        else:
            h = self.first_step
            if h is None:
                h = TORCHDIFFEQ.initial_step(term.f, t0, term.y0, tab.order, self.rtol, self.atol, f0, term.error_norm)
            evaluations = (tab.stages - 1 if tab.fsal else tab.stages) * (times[-1] - times[0]) / h + 2
        if memory is not None:
            term.memory.restore(memory)
        return flops * evaluations

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """The host loops' checkpoint at a save point is the loop's whole state (``RKState``, and
        the fixed grid's next node) and the compile decision, so a resumed run is the
        uninterrupted one bit for bit; the device loop (``sync_every``) keeps its state on the
        device and gives none (a resumed run starts over). An integrator not yet settled
        (``settle``) settles first."""
        decision = (self if self.decision is not None else self.settle(term, grid, start)).decision
        y0, shape = term.y0, term.y0.shape
        field = vector_field(term, compile=decision.compiled)
        # an ensemble's (K, …) state runs flat, its error norm the term's (every member meets the tolerance)
        f = field if y0.ndim == 1 else lambda t, y, out: field(t, y.view(shape), out.view(shape))
        kind = _FixedLoop if not self.tableau.adaptive else _AdaptiveLoop if self.sync_every is None else _DeviceLoop
        loop = kind(self, f, y0.reshape(-1), grid, start, term.error_norm)
        first = 1 if start is None else start["index"] + 1
        if start is None:  # as ODE: the first point counts the evaluations made before it (an adaptive method's f(t0, y0) and initial step)
            theta, velocity = term.split(y0)
            checkpoint = _with_decision(loop.checkpoint(0), decision)
            yield SavePoint(grid.times[0], 0, loop.state.nfe, theta, velocity=velocity, checkpoint=checkpoint, stats={"rejected_steps": 0})
        for index in range(first, len(grid.times)):
            theta, velocity = term.split(loop.advance(grid.times[index]).view(shape))
            s = loop.state
            stats = {"rejected_steps": s.rejected}
            checkpoint = _with_decision(loop.checkpoint(index), decision)
            yield SavePoint(grid.times[index], s.accepted, s.nfe, theta, velocity=velocity, checkpoint=checkpoint, stats=stats)


#: compile="auto" compiles a CPU solve whose eager work is estimated (``RK.work_estimate``) at
#: this many flops or more. Compiling pays once it saves more than it costs: on the benchmark
#: MLP (64-128-128-10, 512 examples, float64, 2 threads; benchmarks/peer_diffrax.py; 7.1e7
#: flops an evaluation) it costs C ≈ 14–18 s and saves s ≈ 0.3 of each evaluation (2.1 → 1.46
#: ms: BENCHMARKS.md), so from an eager solve of C/s ≈ 50 s on: 50 s × 3e10 flop/s ≈ 1.5e12
#: flops. The threshold sits lower, so that a 60-s solve compiles even where the rate or the
#: estimate is 1.5× off. The estimate is high where the steps grow after the first (1.15–3.3×
#: on that MLP at rtol 1e-6 … 1e-7), so a solve of 10–30 s may compile and take up to C more
#: than eager. No test comes within 100× of it (the largest, a CentralFlow run, 8e9 flops).
AUTO_COMPILE_FLOPS = 1e12


class ProductFlops(TorchDispatchMode):
    """Counts the flops of the operators that torch's ``FlopCounterMode`` has formulas for
    (matrix products, convolutions, attention; its ``flop_registry``), as it counts them, run
    inside it; FlopCounterMode itself also tracks modules and decomposes the operators it has
    no formula for. It runs outside any compilation, so it opts out of torch wrapping its
    dispatch in TorchDynamo's ``disable`` (``_should_skip_dynamo``, the hook TorchDispatchMode
    documents for this), whose first call imports TorchDynamo and sympy: ~1.5 s of a process's
    first simulate call, for a count that takes milliseconds."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@dataclass(frozen=True)
class CompileDecision:
    """Whether a run evaluates its term's compiled field (``VectorField.compiled``), and why;
    decided once before its first step (``RK.settle``), it goes into the record's
    ``integrator`` attr and into every checkpoint."""

    compiled: bool
    reason: str


def _compile_now(term: VectorField, t0: float, reason: str, quiet: bool) -> CompileDecision:
    """Compile the term's field before the run by evaluating it once at (t0, y0) (its memory
    left as it was): `reason` with compiled=True, or, where compiling falls back to the eager
    evaluation (a RuntimeWarning "compile: …": the model cannot be traced, a chunked problem,
    an ensemble), compiled=False with the warning's words, the warning re-issued unless
    `quiet`. Other warnings pass as they came."""
    if term.compiled is None:
        return CompileDecision(False, f"{reason}; not compiled: the dynamics gives no compiled field")
    memory = term.memory.state() if term.memory is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        term.compiled().f(torch.tensor(t0, dtype=torch.float64), term.y0)
    if memory is not None:
        term.memory.restore(memory)
    fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("compile:")]
    for w in caught:
        if not (quiet and w in fallbacks):
            warnings.warn(w.message, w.category, stacklevel=3)
    if fallbacks:
        return CompileDecision(False, f"{reason}; not compiled: {str(fallbacks[0].message).removeprefix('compile: ')}")
    return CompileDecision(True, reason)


def _with_decision(checkpoint: dict[str, Any] | None, decision: CompileDecision) -> dict[str, Any] | None:
    """A loop's checkpoint with the run's compile decision (what ``RK.settle`` restores)."""
    return None if checkpoint is None else {**checkpoint, "compiled": decision.compiled, "compile_reason": decision.reason}


def vector_field(term: VectorField, compile: bool = False) -> Callable[[float | Tensor, Tensor, Tensor], None]:
    """f(t, y, out): out ← y'(t), the term's field (through its compiled gradient with
    `compile`). A float time goes in as one 0-d float64 tensor refilled at each call (no
    allocation on the solver's side); a 0-d tensor (the device loop's time, on the device) goes
    in as it is."""
    if compile:  # the field's gradients through one compiled forward+backward graph
        term = term.compiled() if term.compiled is not None else term
    field = term.f
    time = torch.zeros((), dtype=torch.float64)

    def f(t: float | Tensor, y: Tensor, out: Tensor) -> None:
        out.copy_(field(t if isinstance(t, Tensor) else time.fill_(t), y))

    return f


# ----------------------------------------------------------------------------------------- the loops


@dataclass
class RKState:
    """All an RK loop carries between steps (what a checkpoint would save).

    The last accepted step went from (t0, y0) to (t1, y1) with size h and stages ``stages``
    (its dense output: y(t0 + x h) = y0 + h stagesᵀ w(x)); before any step t0 = t1 and
    (adaptive methods) stages[0] = f(t0, y0). ``rolled`` is False while that step has not yet been rolled over
    (y0 ← y1, k_0 ← f1). `dt` is the next step size to try."""

    t0: float
    t1: float
    h: float
    dt: float
    y0: Tensor
    y1: Tensor
    stages: Tensor
    rolled: bool = True
    accepted: int = 0
    rejected: int = 0
    nfe: int = 0


class _Loop:
    """The stages of one step on preallocated buffers; subclasses own the step control. With
    `start` (a checkpoint of ``checkpoint``) it goes on from the state held there; `error_norm`
    is the term's norm of the scaled error (an ensemble's worst member; None: RMS)."""

    def __init__(
        self,
        integrator: RK,
        f: Callable[[float, Tensor, Tensor], None],
        y0: Tensor,
        grid: SaveGrid,
        start: dict[str, Any] | None = None,
        error_norm: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        tab = integrator.tableau
        self.integrator, self.tableau, self.f, self.error_norm = integrator, tab, f, error_norm
        # rows of K: the s stages, and f(t1, y1) after them where the last stage is not at y1
        self.f1_row = tab.stages - 1 if tab.fsal else tab.stages
        rows = self.f1_row + 1
        like = dict(dtype=y0.dtype, device=y0.device)
        self.a = [torch.tensor(row, **like) for row in tab.a]
        self.b = torch.tensor(tab.b, **like)
        stages = torch.empty(rows, *y0.shape, **like)
        self.y_stage = torch.empty_like(y0)
        if start is None:
            self.state = RKState(grid.times[0], grid.times[0], 0.0, 0.0, y0.clone(), y0.clone(), stages, rolled=True)
        else:
            self.state = RKState(**{field.name: start[field.name] for field in dataclasses.fields(RKState)})
        #: the state's tensors that a checkpoint holds (the start's, the last yielded one's): never written
        self.lent: list[Tensor] = [] if start is None else [self.state.y0, self.state.y1, self.state.stages]

    def checkpoint(self, index: int) -> dict[str, Any] | None:
        """Everything to go on after save point `index`: the state itself, its tensors by
        reference, not copied (integrators.base). The loop writes only into y1 and the stages
        (y0 is read, and swapped with y1 by ``_roll``), so from here on it writes into new ones."""
        s = self.state
        self.lent = [s.y0, s.y1, s.stages]
        return {"index": index, **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}}

    def _evaluate(self, t: float, y: Tensor, out: Tensor) -> None:
        self.state.nfe += 1
        self.f(t, y, out)

    def _roll(self) -> None:
        """Start the next step from the end of the last accepted one (every step starts here,
        before it writes anything): y0 ↔ y1, stages[0] ← f1. Where a checkpoint holds y1 or the
        stages, the step gets new, uninitialised ones instead (no copy but f1's row); y0 is
        only read, so it may stay a checkpoint's until the next roll makes it y1."""
        s = self.state
        first = None if s.rolled else s.stages[self.f1_row]
        if not s.rolled:
            s.y0, s.y1 = s.y1, s.y0
            s.t0 = s.t1
            s.rolled = True
        if self.lent:
            if any(s.y1 is t for t in self.lent):
                s.y1 = torch.empty_like(s.y1)
            if any(s.stages is t for t in self.lent):
                first = s.stages[0] if first is None else first
                s.stages = torch.empty_like(s.stages)
            self.lent = [t for t in self.lent if t is s.y0]
        if first is not None:
            s.stages[0].copy_(first)

    def _stages(self, t0: float, h: float) -> None:
        """stages[1:s] and y1 of a step of size h from (t0, y0, stages[0])."""
        s, tab = self.state, self.tableau
        K = s.stages
        for i in range(1, tab.stages):
            target = s.y1 if tab.fsal and i == tab.stages - 1 else self.y_stage
            torch.addmv(s.y0, K[:i].T, self.a[i], alpha=h, out=target)
            self._evaluate(t0 + tab.c[i] * h if tab.c[i] != 1 else t0 + h, target, K[i])
        if not tab.fsal:
            torch.addmv(s.y0, K[: tab.stages].T, self.b, alpha=h, out=s.y1)


class _FixedLoop(_Loop):
    """torchdiffeq's fixed grid (``step_size``, or the save times) and its linear interpolation."""

    def __init__(self, integrator: RK, f, y0: Tensor, grid: SaveGrid, start: dict[str, Any] | None = None, error_norm=None) -> None:
        super().__init__(integrator, f, y0, grid, start, error_norm)
        times = torch.tensor(grid.times, dtype=torch.float64)
        if integrator.step_size is not None:  # FixedGridODESolver._grid_constructor_from_step_size
            n = torch.ceil((times[-1] - times[0]) / integrator.step_size + 1).item()
            steps = torch.arange(0, n, dtype=torch.float64) * integrator.step_size + times[0]
            steps[-1] = times[-1]
            times = steps
        self.grid = times.tolist()
        self.next = 1 if start is None else start["next"]

    def checkpoint(self, index: int) -> dict[str, Any]:
        return {**super().checkpoint(index), "next": self.next}

    def advance(self, time: float) -> Tensor:
        s = self.state
        while time > s.t1:
            self._roll()
            self._evaluate(s.t0, s.y0, s.stages[0])
            t1 = self.grid[self.next]
            h = t1 - s.t0
            self._stages(s.t0, h)
            s.t1, s.h, s.rolled = t1, h, False
            s.accepted += 1
            self.next += 1
        if time == s.t0:
            return s.y0.clone()
        if time == s.t1:
            return s.y1.clone()
        x = (time - s.t0) / (s.t1 - s.t0)
        return s.y0 + x * (s.y1 - s.y0)


class _AdaptiveLoop(_Loop):
    """torchdiffeq's RKAdaptiveStepsizeODESolver: error control, step-size update, dense output."""

    def __init__(self, integrator: RK, f, y0: Tensor, grid: SaveGrid, start: dict[str, Any] | None = None, error_norm=None) -> None:
        super().__init__(integrator, f, y0, grid, start, error_norm)
        tab, s = self.tableau, self.state
        if start is None:
            self._evaluate(s.t0, s.y0, s.stages[0])
        like = dict(dtype=y0.dtype, device=y0.device)
        self.b_error = torch.tensor(tab.b_error, **like)
        self.controller = StepSizeController(tab.order, integrator.safety, integrator.ifactor, integrator.dfactor)
        self.error = torch.empty_like(y0)
        self.scale = torch.empty_like(y0)
        # the tolerances and the norm as 0-d tensors: a Python scalar in a tensor op allocates one
        self.rtol, self.atol = torch.tensor(integrator.rtol, **like), torch.tensor(integrator.atol, **like)
        self.norm = torch.empty((), **like)
        # dense output weights: y(t0 + x h) = y0 + h Kᵀ (x e_0 + x² w2 + x³ w3 + x⁴ w4)
        e0, f1, b, m = torch.zeros(4, s.stages.shape[0], dtype=torch.float64)
        e0[0], f1[self.f1_row] = 1.0, 1.0
        b[: tab.stages], m[: tab.stages] = torch.tensor(tab.b, dtype=torch.float64), torch.tensor(tab.b_mid, dtype=torch.float64)
        self.dense = torch.stack([e0, f1 - 4 * e0 - 5 * b + 16 * m, 5 * e0 - 3 * f1 + 14 * b - 32 * m, 2 * (f1 - e0) - 8 * b + 16 * m])
        if start is None:
            s.dt = integrator.first_step if integrator.first_step is not None else self._initial_step()

    def _initial_step(self) -> float:
        s = self.state

        def f(t: Tensor, y: Tensor) -> Tensor:
            out = torch.empty_like(y)
            self._evaluate(float(t), y, out)
            return out

        t0 = torch.tensor(s.t0, dtype=torch.float64)
        rtol, atol = self.integrator.rtol, self.integrator.atol
        return TORCHDIFFEQ.initial_step(f, t0, s.y0, self.tableau.order, rtol, atol, s.stages[0], self.error_norm)

    def advance(self, time: float) -> Tensor:
        s = self.state
        while time > s.t1:
            self._step()
        if time == s.t1:
            return s.y1.clone()
        return self._interpolate(time)

    def _interpolate(self, time: float) -> Tensor:
        """y(time) = y0 + h Kᵀ w(x), x = (time − t0)/(t1 − t0), inside the last accepted step."""
        s = self.state
        weights = self.dense.T @ torch.tensor([(time - s.t0) / (s.t1 - s.t0)], dtype=torch.float64).pow(torch.arange(1, 5))
        return torch.addmv(s.y0, s.stages.T, weights.to(s.y0), alpha=s.h)

    def _step(self) -> None:
        """One attempt: accept it (the state then ends at t0 + dt) or shrink dt."""
        integrator, s = self.integrator, self.state
        self._roll()
        if integrator.max_steps is not None and s.accepted + s.rejected >= integrator.max_steps:
            raise too_many_steps("RK", integrator.max_steps, s.t0)
        h = s.dt
        t1 = s.t0 + h
        if not t1 > s.t0:
            raise step_size_underflow("RK", h, s.t0)
        self._stages(s.t0, h)
        ratio = self._error_ratio(h)
        if math.isnan(ratio):
            raise not_finite("RK", s.t0, h)
        if ratio <= 1:
            if not self.tableau.fsal:
                self._evaluate(t1, s.y1, s.stages[self.f1_row])
            s.t1, s.h, s.rolled = t1, h, False
            s.accepted += 1
        else:
            s.rejected += 1
        s.dt = self.controller.next(h, ratio)

    def _error_ratio(self, h: float) -> float:
        """rms(e / (atol + rtol·max(|y0|, |y1|))) with e = h Σ_j (b_j − b̂_j) k_j."""
        self._error_norm(self.state.y0, self.state.y1, self.state.stages)
        return abs(h) * self.norm.item() / math.sqrt(self.error.numel())

    def _error_norm(self, y_start: Tensor, y_end: Tensor, stages: Tensor) -> None:
        """norm ← |Σ_j (b_j − b̂_j) k_j / (atol + rtol·max(|y_start|, |y_end|))|₂ (the ratio without
        h/√n); with the term's `error_norm` (RMS-like), √n times it."""
        torch.abs(y_start, out=self.scale)
        torch.abs(y_end, out=self.error)
        torch.maximum(self.scale, self.error, out=self.scale)
        torch.addcmul(self.atol, self.scale, self.rtol, out=self.scale)
        torch.mv(stages[: self.tableau.stages].T, self.b_error, out=self.error)
        self.error.div_(self.scale)
        if self.error_norm is None:
            torch.linalg.vector_norm(self.error, out=self.norm)
        else:
            self.norm.copy_(self.error_norm(self.error).mul(math.sqrt(self.error.numel())))

class _DeviceLoop(_AdaptiveLoop):
    """The adaptive loop with every decision on the device, for GPUs: the host reads the state
    once per chunk of attempts, not once per step (``RK(sync_every=n)``).

    An attempt is tensor operations alone: from the accepted (t, y1) with stages[0] = f(t, y1)
    in a work buffer, the stages and y_new of a step of size dt, the error ratio r, then::

        active = t < target, no failure so far, max_steps not reached
        accept = active and r ≤ 1
        on accept: (t0, y0, h, stages) ← (t, y1, dt, work); y1 ← y_new; work[0] ← f(t + dt, y_new); t ← t + dt
        when active: dt ← dt · factor(r)           (the same controller as the host loop's)

    Outside `active` an attempt changes nothing (every update is a ``torch.where``), so the
    host may launch more attempts than needed, at the cost of their evaluations. To reach a save
    time it launches half the steps it expects to need (at least one, at most `sync_every`;
    ``_steps_needed``) and then reads t, dt and the counters in one transfer. A non-FSAL method
    evaluates f(t + dt, y_new) in every attempt, accepted or not (counted, as the host loop
    counts it, only when accepted).
    With ``cuda_graph=True`` one attempt is captured as a CUDA graph after two live warm-up
    attempts on a side stream, and each later launch is one replay."""

    WARM_UP: ClassVar[int] = 2

    def __init__(self, integrator: RK, f, y0: Tensor, grid: SaveGrid, start: dict[str, Any] | None = None, error_norm=None) -> None:
        super().__init__(integrator, f, y0, grid, start, error_norm)
        s = self.state
        like64 = dict(dtype=torch.float64, device=y0.device)
        self.work = s.stages.clone()  # work[0] = f(t0, y0)
        self.y_new, self.combo = torch.empty_like(y0), torch.empty_like(y0)
        # t: the accepted time; t0, h: the last accepted step; target: the save time to reach (−∞ masks every attempt)
        self.t, self.t0 = torch.tensor(s.t0, **like64), torch.tensor(s.t0, **like64)
        self.h, self.dt = torch.tensor(s.h, **like64), torch.tensor(s.dt, **like64)
        self.target = torch.tensor(-math.inf, **like64)
        self.counts = torch.zeros(5, **like64)  # accepted, rejected, evaluations, NaN failures, step-size underflows
        self.base_nfe = s.nfe  # f(t0, y0) and the initial step's, made on the host
        self.launched, self.reads = 0, 0  # attempts launched (masked ones included), read-backs of the state
        self.failures = [0.0, 0.0]  # NaN failures, step-size underflows, at the last synchronisation
        self.growth = integrator.ifactor  # dt's factor per accepted step over the last chunk (at first the most it can be)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.to_capture = integrator.cuda_graph  # after WARM_UP live attempts on a side stream

    def _attempt(self) -> None:
        tab, s, w, t, h, counts = self.tableau, self.state, self.work, self.t, self.dt, self.counts
        active = (t < self.target) & (counts[3] + counts[4] == 0)
        if self.integrator.max_steps is not None:
            active = active & (counts[0] + counts[1] < self.integrator.max_steps)
        h_y = h.to(s.y1.dtype)
        for i in range(1, tab.stages):
            stage = self.y_new if tab.fsal and i == tab.stages - 1 else self.y_stage
            torch.mv(w[:i].T, self.a[i], out=self.combo)
            torch.addcmul(s.y1, self.combo, h_y, out=stage)
            self.f(t + tab.c[i] * h if tab.c[i] != 1 else t + h, stage, w[i])
        if not tab.fsal:
            torch.mv(w[: tab.stages].T, self.b, out=self.combo)
            torch.addcmul(s.y1, self.combo, h_y, out=self.y_new)
        self._error_norm(s.y1, self.y_new, w)  # _error_ratio, on the device
        ratio = h.abs() * self.norm.to(torch.float64) / math.sqrt(self.error.numel())
        t1 = t + h
        nan, underflow = active & torch.isnan(ratio), active & ~(t1 > t)
        decided = active & ~nan & ~underflow  # an attempt that neither failed nor was masked
        accept = decided & (ratio <= 1)
        if not tab.fsal:
            self.f(t1, self.y_new, w[self.f1_row])
        torch.where(accept, s.y1, s.y0, out=s.y0)
        torch.where(accept, w, s.stages, out=s.stages)
        torch.where(accept, self.y_new, s.y1, out=s.y1)
        torch.where(accept, w[self.f1_row], w[0], out=w[0])
        torch.where(accept, t, self.t0, out=self.t0)
        torch.where(accept, h, self.h, out=self.h)
        torch.where(accept, t1, t, out=self.t)
        torch.where(decided, self.controller.next_on_device(h, ratio), h, out=self.dt)
        evaluations = active.double() * (tab.stages - 1) + (0 if tab.fsal else accept.double())
        counts.add_(torch.stack([accept.double(), (decided & ~accept).double(), evaluations, nan.double(), underflow.double()]))

    def _launch(self) -> None:
        """One attempt: a replay of its graph; before capture, a live warm-up attempt on a side
        stream (what capture needs first); then the capture, after which the graph replays."""
        if self.to_capture and self.launched >= self.WARM_UP:
            self.to_capture, self.graph = False, self._capture()
        if self.graph is not None:
            self.graph.replay()
        elif self.to_capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._attempt()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._attempt()
        self.launched += 1

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """One attempt as a CUDA graph (capturing runs nothing); None, with a warning, when capture fails."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._attempt()
            return graph
        except Exception as exc:  # noqa: BLE001 — any failure of capture: launch the kernels instead
            warnings.warn(f"cuda_graph: capture failed ({type(exc).__name__}: {exc}); launching each attempt's kernels", RuntimeWarning, stacklevel=2)
            return None

    def advance(self, time: float) -> Tensor:
        s = self.state
        while time > s.t1:
            self._check()
            chunk = max(1, min(self.integrator.sync_every, math.ceil(self._steps_needed(time - s.t1) / 2)))
            self.target.fill_(time)
            accepted, dt = s.accepted, s.dt
            for _ in range(chunk):
                self._launch()
            self._sync()
            if s.accepted > accepted:  # dt grew by this factor a step over the chunk
                self.growth = max(1.0, (s.dt / dt) ** (1 / (s.accepted - accepted)))
        if time == s.t1:
            return s.y1.clone()
        return self._interpolate(time)

    def checkpoint(self, index: int) -> None:
        """None: the loop's state lives on the device between synchronisations."""
        return None

    def _steps_needed(self, distance: float) -> float:
        """Steps to cover `distance` if each multiplies dt by the growth g seen in the last
        chunk (before any: ifactor, the most): dt (gⁿ − 1)/(g − 1) = distance, so
        n = log(1 + distance (g − 1)/dt) / log g."""
        g, dt = self.growth, self.state.dt
        return distance / dt if g < 1 + 1e-9 else math.log1p(distance * (g - 1) / dt) / math.log(g)

    def _sync(self) -> None:
        """The host's copy of the device's decisions: one transfer."""
        s = self.state
        self.reads += 1
        s.t0, s.t1, s.h, s.dt, accepted, rejected, nfe, *self.failures = torch.cat(
            [torch.stack([self.t0, self.t, self.h, self.dt]), self.counts]
        ).tolist()
        s.accepted, s.rejected, s.nfe = int(accepted), int(rejected), self.base_nfe + int(nfe)

    def _check(self) -> None:
        """The host loop's IntegrationErrors, from the last synchronised state."""
        s, max_steps = self.state, self.integrator.max_steps
        nan, underflow = self.failures
        if nan:
            raise not_finite("RK", s.t1, s.dt)
        if underflow:
            raise step_size_underflow("RK", s.dt, s.t1)
        if max_steps is not None and s.accepted + s.rejected >= max_steps:
            raise too_many_steps("RK", max_steps, s.t1)


__all__ = ["RK", "AUTO_COMPILE_FLOPS", "CompileDecision", "ButcherTableau", "TABLEAUS", "RKState", "vector_field"]
