"""RK(compile="auto"), the default: the library decides once, before the first step, from the
inputs alone, whether a run evaluates the compiled gradient; the decision is in the record and a
resumed run keeps it. No test here runs the real compiler: a stand-in returns the traced graph
(``test_fast_rk.test_compiled_vector_field_equals_eager`` runs TorchInductor once)."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch._inductor
from torch import Tensor

import flowsim as fs
from flowsim import data, models
from flowsim.config import load_config
from flowsim.defaults import default_integrator
from flowsim.errors import ConfigError
from flowsim.integrators import RK, SaveGrid
from flowsim.integrators import rk
from flowsim.terms import VectorField
from flowsim.toml import run_toml

from conftest import build_problem
from test_fast_rk import Branching
from test_resume import interrupt_at, same

RUN = {"t1": 0.6, "save_every": 0.1, "laws": [], "observe": ("loss", "params"), "progress": False}
#: the flows' default (integrator=None) with compile set: what the default run is compared with
EAGER, COMPILED = (dataclasses.replace(default_integrator(fs.GradientFlow()), compile=c) for c in (False, True))


@pytest.fixture
def compiles(monkeypatch) -> list[int]:
    """TorchInductor replaced by a stand-in that returns the traced graph (make_fx's functional
    gradient, equal to the eager one to round-off); one entry per compile."""
    calls = []

    def stand_in(graph, inputs):
        calls.append(1)
        return graph

    monkeypatch.setattr(torch._inductor, "compile", stand_in)
    return calls


def same_run(a, b) -> None:
    """Identical records but for what says how each was asked to compile (``same``: wall_time aside)."""
    blank = {"integrator": "", "config": "", "fingerprint": ""}
    same(a.assign_attrs(blank), b.assign_attrs(blank))


def decided(ds) -> tuple[bool, str]:
    integrator = json.loads(ds.attrs["integrator"])
    return integrator["compiled"], integrator["compile_reason"]


def linear_flops(problem: fs.Problem) -> float:
    """The flops of one gradient of an MLP as FlopCounterMode counts them, by hand: per Linear
    (out × in) on N examples 2·N·in·out for the forward product, the same for the weight
    gradient and for the input gradient, which the first layer does not take (X needs none)."""
    n = problem.n_examples
    products = [math.prod(shape) for shape in problem.shapes if len(shape) == 2]
    return 2 * n * (3 * sum(products) - products[0])


# ----------------------------------------------------------------------------------------- the rule


def test_work_estimate_is_flops_times_evaluations():
    """W = F·n with F the field's flops (checked by hand on an MLP) and n the evaluations:
    exact for a fixed-step method (the run's own count), 6·span/h + 2 for dopri5 from the
    first step h the loop takes (first_step, or torchdiffeq's selection, read from the run's
    first checkpoint). A wrong count or a missed backward product changes W by a whole factor."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    term = fs.GradientFlow().term(problem, problem.initial_theta())
    flops, grid = linear_flops(problem), SaveGrid((0.0, 0.5, 1.0))
    fixed = RK("rk4", step_size=0.125)
    assert fixed.work_estimate(term, grid) == flops * list(fixed.solve(term, grid, 0))[-1].nfe == flops * 4 * 8
    assert RK("dopri5", first_step=0.125).work_estimate(term, grid) == flops * (6 * 8 + 2)
    adaptive = RK("dopri5", rtol=1e-6, atol=1e-6)
    h = list(adaptive.solve(term, grid, 0))[0].checkpoint["dt"]
    assert adaptive.work_estimate(term, grid) == pytest.approx(flops * (6 * 1.0 / h + 2), rel=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_product_flops_count_as_flop_counter_mode(kind):
    """RK's flop count (``rk.ProductFlops``: torch's formulas, read by a dispatch mode of its
    own) gives FlopCounterMode's total for one gradient, matrix products, convolutions and
    attention alike: a formula skipped or counted twice changes it by a whole term."""
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "transformer":  # an image's 8 rows as 8 tokens of 8 features
        X, y = data.digits(n_train=16)
        problem = fs.Problem(models.attention.transformer(num_classes=10), (X.view(-1, 8, 8), y))
    else:
        problem = build_problem(kind, n=16)
    theta = problem.initial_theta()
    with rk.ProductFlops() as ours:
        problem.loss_and_grad(theta)
    with FlopCounterMode(display=False) as theirs:
        problem.loss_and_grad(theta)
    assert ours.total == theirs.get_total_flops() > 0


def test_default_first_call_does_not_import_torchdynamo():
    """A process's first default simulate (compile="auto" deciding from the flop count) imports
    neither TorchDynamo nor sympy: their first import costs ~1.5 s, more than the short solves
    the decision keeps eager (run in a fresh interpreter, where nothing has imported them)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, flowsim as fs\n"
        "from flowsim import models\n"
        "X, y = torch.randn(16, 64, dtype=torch.float64), torch.randint(0, 10, (16,))\n"
        "problem = fs.Problem(models.mlp.mlp(depth=1, width=8).double(), (X, y))\n"
        "ds = fs.simulate(problem, fs.GradientFlow(), t1=0.2, save_every=0.1, laws=[], progress=False)\n"
        "assert 'auto' in ds.attrs['integrator'], ds.attrs['integrator']\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def benchmark_mlp() -> fs.Problem:
    """benchmarks/peer_diffrax.py's MLP: 64-128-128-10 ReLU, 512 N(0, 1) examples, float64."""
    rng = np.random.default_rng(0)
    X, y = torch.tensor(rng.standard_normal((512, 64))), torch.tensor(rng.integers(0, 10, 512))
    torch.manual_seed(0)
    return fs.Problem(models.mlp.mlp(depth=2, width=128).double(), (X, y))


def test_threshold_keeps_small_runs_eager_and_compiles_a_long_solve():
    """The benchmark MLP (7.1e7 flops a gradient) by dopri5 at 1e-6: to t = 10 (170 evaluations,
    under a second) it stays eager; to t = 700 (~28,000 evaluations at the 40 per unit time it
    takes to t = 50, about a minute eager on the 2-core CPU, where compiling pays:
    AUTO_COMPILE_FLOPS) it compiles. The quickstart's run is ≥ 1e4 times below the threshold."""
    problem = benchmark_mlp()
    term = fs.GradientFlow().term(problem, problem.initial_theta())
    dopri5 = RK("dopri5", rtol=1e-6, atol=1e-6)
    assert dopri5.work_estimate(term, SaveGrid((0.0, 10.0))) < rk.AUTO_COMPILE_FLOPS
    assert dopri5.work_estimate(term, SaveGrid((0.0, 700.0))) >= rk.AUTO_COMPILE_FLOPS
    X, y = data.digits(n_train=64)
    torch.manual_seed(0)
    quickstart = fs.Problem(models.mlp.mlp(depth=2, width=8), (X, y), weight_decay=1e-4)
    term = fs.GradientFlow().term(quickstart, quickstart.initial_theta())
    assert RK("dopri5", rtol=1e-6, atol=1e-6).work_estimate(term, SaveGrid((0.0, 0.5))) < 1e-4 * rk.AUTO_COMPILE_FLOPS


def test_auto_decides_from_the_estimate(compiles, monkeypatch):
    """Below the threshold: eager, nothing compiled; at or above it (the estimate's inputs
    monkeypatched, not a long solve): compiled before the first step, once; either way the
    reason names the estimate. compile=True and False stay switches whatever the estimate."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    term, grid = fs.GradientFlow().term(problem, problem.initial_theta()), SaveGrid((0.0, 0.5))
    small = RK().settle(term, grid).decision
    assert not small.compiled and "flops <" in small.reason and compiles == []
    assert RK(compile=True).settle(term, grid).decision.compiled and compiles == [1]
    assert not RK(compile=False).settle(term, grid).decision.compiled
    monkeypatch.setattr(RK, "work_estimate", lambda self, term, grid: 2 * rk.AUTO_COMPILE_FLOPS)
    large = RK().settle(term, grid).decision
    assert large.compiled and "flops >=" in large.reason
    other = build_problem("mlp", n=32, depth=1, width=6)  # another problem: a compile of its own
    assert RK().settle(fs.GradientFlow().term(other, other.initial_theta()), grid).decision.compiled and compiles == [1, 1]
    assert not RK(compile=False).settle(term, grid).decision.compiled


def test_auto_stays_eager_where_it_cannot_compile_or_is_not_calibrated(compiles, monkeypatch):
    """Members (an ensemble) run batched and never compile; off the CPU auto does not guess
    (its threshold is calibrated there); neither evaluates the field to decide."""
    monkeypatch.setattr(rk, "AUTO_COMPILE_FLOPS", 0.0)

    def never(t: Tensor, y: Tensor) -> Tensor:
        raise AssertionError("evaluated to decide")

    y0 = torch.zeros(3, device="meta")
    on_meta = VectorField(f=never, y0=y0, split=lambda y: (y, None), compiled=lambda: on_meta)
    assert "CPU only" in RK().settle(on_meta, SaveGrid((0.0, 1.0))).decision.reason
    ensemble = VectorField(f=never, y0=torch.zeros(2, 3), split=lambda y: (y, None), compiled=lambda: ensemble)
    ensemble.members = ("member", 2)
    decision = RK().settle(ensemble, SaveGrid((0.0, 1.0))).decision
    assert not decision.compiled and "members" in decision.reason and compiles == []


def test_auto_falls_back_silently_and_records_why(compiles, monkeypatch):
    """Where compiling falls back (a model that cannot be traced, a chunked problem), auto runs
    eagerly without a word and records why; compile=True says so with a warning. Both runs equal
    the compile=False run bit for bit (the eager field, the same evaluations)."""
    monkeypatch.setattr(rk, "AUTO_COMPILE_FLOPS", 0.0)
    torch.manual_seed(0)
    branching = fs.Problem(Branching().double(), (torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3))
    chunked = build_problem("mlp", n=32, depth=1, width=8)
    chunked = fs.Problem(chunked.model, (chunked.X, chunked.y), chunk_size=16)
    for problem, why in [(branching, "compiling the gradient failed"), (chunked, "chunk_size=16")]:
        eager = fs.simulate(problem, fs.GradientFlow(), EAGER, **RUN)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            auto = fs.simulate(problem, fs.GradientFlow(), **RUN)
        compiled, reason = decided(auto)
        assert not compiled and reason.startswith("auto: estimated work") and why in reason
        with pytest.warns(RuntimeWarning, match=why):
            forced = fs.simulate(problem, fs.GradientFlow(), COMPILED, **RUN)
        assert decided(forced) == (False, f"compile=True; not compiled: {reason.split('; not compiled: ')[1]}")
        same_run(auto, eager)
        same_run(forced, eager)
    assert compiles == []  # make_fx refused the branching model before any compiler ran


def test_deciding_leaves_the_run_as_compile_false_takes_it():
    """auto's two evaluations to decide happen outside the run: its record equals the
    compile=False record bit for bit (the integrator attr aside), and a term's memory
    (``terms.Memory``: what its field carries between evaluations) is as it was."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    auto = fs.simulate(problem, fs.GradientFlow(), **RUN)
    eager = fs.simulate(problem, fs.GradientFlow(), EAGER, **RUN)
    assert json.loads(auto.attrs["integrator"])["compile"] == "auto"
    same_run(auto, eager)

    class Calls:
        count = torch.zeros(())

        def state(self) -> dict[str, Tensor]:
            return {"count": self.count}

        def restore(self, state: dict[str, Tensor]) -> None:
            self.count = state["count"]

    memory = Calls()

    def f(t: Tensor, y: Tensor) -> Tensor:
        memory.count = memory.count + 1  # replaced, never changed in place (the Memory contract)
        return -y

    y0 = torch.ones(4, dtype=torch.float64)
    term = VectorField(f=f, y0=y0, split=lambda y: (y, None), compiled=lambda: term, memory=memory)
    for integrator in (RK(), RK(compile=True)):
        integrator.settle(term, SaveGrid((0.0, 1.0)))
    assert memory.count == 0


# ----------------------------------------------------------------------------------------- record and resume


def rounding_otherwise(calls: list[int]):
    """A stand-in compiler whose gradient is the traced one times (1 + 1e-12), as the compiled
    kernels' other rounding would be: a run on the other gradient than the one it should use
    shows in every row after the first."""

    def compile(graph, inputs):
        calls.append(1)
        return lambda *args: tuple(out * (1 + 1e-12) for out in graph(*args))

    return compile


def test_the_decision_is_recorded_and_a_resumed_run_keeps_it(monkeypatch, tmp_path):
    """auto decided to compile (threshold 0): the record says so. Stopped at its 4th save point,
    then resumed in what looks like a new process (the compiled gradients forgotten) where the
    rule would now say eager (threshold back at 1e12): the resumed run takes the decision from
    its checkpoint, compiles again, and equals the uninterrupted compiled run bit for bit,
    which the eager run does not."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    eager = fs.simulate(problem, fs.GradientFlow(), EAGER, **RUN)
    calls = []
    monkeypatch.setattr(torch._inductor, "compile", rounding_otherwise(calls))
    monkeypatch.setattr(rk, "AUTO_COMPILE_FLOPS", 0.0)
    whole = fs.simulate(problem, fs.GradientFlow(), **RUN)
    assert decided(whole)[0] and decided(whole)[1].startswith("auto: estimated work") and calls == [1]
    assert (whole.params.values[1:] != eager.params.values[1:]).any(axis=1).all()
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(problem, fs.GradientFlow(), out=tmp_path / "r.zarr", **RUN)
    monkeypatch.undo()  # the threshold back at 1e12, the real compiler back: patched again
    monkeypatch.setattr(torch._inductor, "compile", rounding_otherwise(calls))
    problem._compiled_cache.clear()
    resumed = fs.simulate(problem, fs.GradientFlow(), out=tmp_path / "r.zarr", resume=True, **RUN)
    assert calls == [1, 1]
    same(resumed, whole)


def test_an_eager_decision_is_kept_on_resume(monkeypatch, tmp_path):
    """The other way round: a run decided eager, resumed where the rule would compile, stays eager."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    whole = fs.simulate(problem, fs.GradientFlow(), **RUN)
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(problem, fs.GradientFlow(), out=tmp_path / "r.zarr", **RUN)
    monkeypatch.undo()
    monkeypatch.setattr(rk, "AUTO_COMPILE_FLOPS", 0.0)
    monkeypatch.setattr(torch._inductor, "compile", lambda graph, inputs: pytest.fail("compiled on resume"))
    same(fs.simulate(problem, fs.GradientFlow(), out=tmp_path / "r.zarr", resume=True, **RUN), whole)


# ----------------------------------------------------------------------------------------- configs


CONFIG = """
[model]
name = "mlp.mlp"
depth = 1
width = 4
[data]
name = "digits"
n_train = 16
[dynamics]
name = "GradientFlow"
[integrator]
name = "RK"
{line}
[run]
t1 = 0.2
save_every = 0.1
"""


@pytest.mark.parametrize("value, expected", [('"auto"', "auto"), ("true", True), ("false", False), ("", "auto")])
def test_config_compile_round_trips(value, expected):
    """compile = "auto" | true | false (absent: "auto") in a config, and back through the TOML a
    run writes: the same integrator."""
    config = load_config(CONFIG.format(line=f"compile = {value}" if value else ""))
    assert config.integrator.compile == expected
    text = run_toml(config.problem, config.dynamics, config.integrator, 0.2, 0.1, 0, "cpu", "float64")
    model_and_data = CONFIG[: CONFIG.index("[dynamics]")]  # a run from Python describes them in comments only
    assert load_config(model_and_data + text).integrator == config.integrator


@pytest.mark.parametrize("value", ['"yes"', "1", '"Auto"', "[true]"])
def test_config_refuses_other_compile_values(value):
    with pytest.raises(ConfigError, match=r"^integrator\.compile: "):
        load_config(CONFIG.format(line=f"compile = {value}"))
