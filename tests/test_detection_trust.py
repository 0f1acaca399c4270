"""Detection never returns a law the flow does not keep: every detected law is checked against
the gradient flowsim integrates (``fs.Problem``: functional_call on θ, training mode), in
float64 at a random θ on random data, and what flowsim cannot see is refused or dropped with a
warning. One test per case of the audit, then random models built from the same parts."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import flowsim as fs
from flowsim.integrators import ODE
from flowsim.laws import Law, LawSet, gradient_check

from conftest import roundoff

#: |⟨∇Q, ∇L⟩| / (|∇Q| |∇L|) of a law in float64: round-off gives ~1e-16, a false law ~1e-2
TOL = 1e-10
N = 12


def kinds(laws: list[Law]) -> list[tuple[str, str, int]]:
    return [(law.kind, law.site, law.size) for law in laws]


def checked(model: nn.Module, X: Tensor, y: Tensor) -> list[Law]:
    """The laws detected on a float64 `model`, each (exact or not) orthogonal to the gradient
    flowsim integrates at a random θ."""
    model = model.double()
    X = X.double()
    problem = fs.Problem(model, (X, y))
    laws = fs.laws.detect(model, inputs=X[:2])
    if laws:
        theta = torch.randn(problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        worst = gradient_check(laws, problem, theta)
        sizes = [law.size for law in laws]
        false = [(law.kind, law.site) for law, part in zip(laws, worst.split(sizes)) if float(part.max()) > TOL]
        assert not false, f"false laws: {false}"
    return laws


def vectors() -> tuple[Tensor, Tensor]:
    """N inputs of 4 features, labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g), torch.randint(3, (N,), generator=g)


def tokens(classes: int = 3) -> tuple[Tensor, Tensor]:
    """N sequences of 6 ids out of 5, as floats (Problem casts X to its dtype; the models take
    x.long()); every id, padding id 0 included, occurs in every sequence."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(5, (N, 6), generator=g)
    X[:, :5] = torch.arange(5)
    return X.double(), torch.randint(classes, (N,), generator=g)


def sequences() -> tuple[Tensor, Tensor]:
    """N sequences of 3 vectors of 4 features, labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 4, generator=g), torch.randint(3, (N,), generator=g)


def mlp() -> nn.Sequential:
    """Linear(4→3) ReLU Linear(3→3) ReLU Linear(3→3): laws 0|2, 2|4 and the head's translation."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))


MLP_LAWS = [("rescale", "0|2", 3), ("rescale", "2|4", 3), ("translation", "4", 4)]


# ------------------------------------------------------------------------ 1. shared Parameters
class TiedLanguageModel(nn.Module):
    """Token embedding, mean over the sequence, [a ReLU layer or a LayerNorm], and a head whose
    weight is the embedding's."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3)
        self.mid = nn.LayerNorm(3, eps=0.0) if norm else nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mid(self.emb(x.long()).mean(1)))


def test_tied_embedding_and_head():
    """Without the tie: emb|mid.0 rescale and linear laws; with it they are false (the head
    reads the same matrix), so none involves the embedding, nor the head."""
    with pytest.warns(UserWarning, match=r"emb\.weight.*used by emb and head"):
        laws = checked(TiedLanguageModel(norm=False), *tokens(classes=5))
    assert kinds(laws) == []


def test_tied_embedding_and_head_through_a_layer_norm():
    """The embedding's whole-layer scale law (LayerNorm at eps = 0, so it is exact and checked)
    is false when the head reads the embedding."""
    with pytest.warns(UserWarning, match=r"emb\.weight.*used by emb and head"):
        laws = checked(TiedLanguageModel(norm=True), *tokens(classes=5))
    assert kinds(laws) == []


class TwoBranches(nn.Module):
    """a(h) + b(c(h)), a and b holding one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(4, 3), nn.Linear(3, 3)
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.a(h) + self.b(torch.relu(self.c(h)))))


def test_one_parameter_in_two_added_branches():
    with pytest.warns(UserWarning, match=r"a\.weight.*used by a and b"):
        laws = checked(TwoBranches(), *vectors())
    # the biases are not tied: shifted against each other they cancel at the add
    assert kinds(laws) == [("translation", "a-b", 3), ("translation", "out", 4)]


class TiedChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.fc1.weight = self.fc2.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(torch.relu(self.inp(x)))))))


def test_tied_layers_in_a_chain():
    with pytest.warns(UserWarning, match=r"fc1\.weight.*used by fc1 and fc2"):
        laws = checked(TiedChain(), *vectors())
    assert kinds(laws) == [("translation", "out", 4)]


def test_a_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.fc, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.relu(self.fc(torch.relu(self.fc(torch.relu(self.inp(x)))))))

    with pytest.warns(UserWarning, match=r"fc\.weight.*used by fc and fc"):
        laws = checked(Twice(), *vectors())
    assert kinds(laws) == [("translation", "out", 4)]


# ------------------------------------------------------------------------ 2. attention's output map used elsewhere
class AttentionOutputReused(nn.Module):
    """nn.MultiheadAttention whose out_proj.weight is also applied to the input: by F.linear in
    forward, or as the weight of another Linear."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = tied
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        if tied:
            self.proj = nn.Linear(4, 4, bias=False)
            self.proj.weight = self.attn.out_proj.weight

    def forward(self, x: Tensor) -> Tensor:
        attended = self.attn(x, x, x)[0]
        return self.head((attended + (self.proj(x) if self.tied else F.linear(x, self.attn.out_proj.weight))).mean(1))


@pytest.mark.parametrize("tied", [False, True], ids=["read-in-forward", "tied-linear"])
def test_attention_output_map_used_outside(tied):
    """The rescale and attention_vo laws of attn involve out_proj.weight: dropped; its query–key
    and key-bias laws do not, and hold."""
    with pytest.warns(UserWarning, match=r"attn\.out_proj\.weight.*used by attn and"):
        laws = checked(AttentionOutputReused(tied), *sequences())
    assert kinds(laws) == [("attention_qk", "attn", 6), ("translation", "attn", 4), ("translation", "head", 5)]


# ------------------------------------------------------------------------ 3. what torch.fx does not see
def shift_output(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """A forward hook that adds a function of the module's input to its output."""
    return output + inputs[0].sum(-1, keepdim=True).tanh()


def shift_input(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (inputs[0] + 1.0,)


def shifted_forward(self: nn.Module, x: Tensor) -> Tensor:
    """A forward set on the instance: the class's, plus one."""
    return type(self).forward(self, x) + 1.0


class Double(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return 2 * weight


def hooked(case: str) -> tuple[nn.Module, str, list[tuple[str, str, int]]]:
    """The MLP with something torch.fx does not see on one module: the model, the warning, and
    the laws left (none involves that module or passes through it)."""
    model = mlp()
    if case == "forward hook":
        model[2].register_forward_hook(shift_output)
        return model, r"2 \(Linear\): has a forward hook", [("translation", "4", 4)]
    if case == "forward pre-hook":
        model[3].register_forward_pre_hook(shift_input)
        return model, r"3 \(ReLU\): has a forward pre-hook", [("rescale", "0|2", 3), ("translation", "4", 4)]
    if case == "forward on the instance":
        model[2].forward = types.MethodType(shifted_forward, model[2])
        return model, r"2 \(Linear\): has its forward replaced on the instance", [("translation", "4", 4)]
    parametrize.register_parametrization(model[2], "weight", Double())
    return model, r"2 \(ParametrizedLinear\): is parametrized", [("translation", "4", 4)]


@pytest.mark.parametrize("case", ["forward hook", "forward pre-hook", "forward on the instance", "parametrization"])
def test_what_torch_fx_does_not_see_on_a_submodule(case):
    """A warning naming the module; no law involves it or passes through it."""
    model, message, expected = hooked(case)
    with pytest.warns(UserWarning, match=message):
        laws = checked(model, *vectors())
    assert kinds(laws) == expected


@pytest.mark.parametrize("case", ["forward hook", "forward pre-hook", "forward on the instance"])
def test_what_torch_fx_does_not_see_on_the_model_itself_is_refused(case):
    model = mlp()
    if case == "forward hook":
        model.register_forward_hook(shift_output)
    elif case == "forward pre-hook":
        model.register_forward_pre_hook(shift_input)
    else:
        model.forward = types.MethodType(shifted_forward, model)
    with pytest.raises(fs.ModelError, match=f"model: .*{case.split(' on')[0]}"):
        fs.laws.detect(model, inputs=torch.randn(2, 4))


def test_a_hook_on_a_container_is_in_the_graph():
    """torch.fx traces a container's hooks and instance forward: the laws follow them."""
    model = nn.Sequential(mlp(), nn.ReLU(), nn.Linear(3, 3))
    model[0].register_forward_hook(lambda module, inputs, output: output.tanh())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        laws = checked(model, *vectors())
    assert kinds(laws) == [("rescale", "0.0|0.2", 3), ("rescale", "0.2|0.4", 3), ("translation", "2", 4)]


def test_backward_hooks_are_refused():
    model = mlp()
    model[2].register_full_backward_hook(lambda module, grad_input, grad_output: (2 * grad_input[0],))
    with pytest.raises(fs.ModelError, match=r"model: 2 \(Linear\) has a backward hook"):
        fs.laws.detect(model, inputs=torch.randn(2, 4))
    handle = nn.modules.module.register_module_forward_hook(shift_output)
    try:
        with pytest.raises(fs.ModelError, match="global forward hook"):
            fs.laws.detect(mlp(), inputs=torch.randn(2, 4))
    finally:
        handle.remove()


# ------------------------------------------------------------------------ 4. training mode
class TrainOnly(nn.Module):
    """tanh between inp and fc in training only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.fc, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        if self.training:
            h = h.tanh()
        return self.out(torch.relu(self.fc(h)))


def test_detection_traces_in_training_mode_and_restores_the_modes():
    model = TrainOnly().eval()
    model.fc.train()
    laws = checked(model, *vectors())
    assert kinds(laws) == [("rescale", "fc|out", 3), ("translation", "out", 4)]
    assert not model.training and not model.inp.training and model.fc.training


# ------------------------------------------------------------------------ 5. embeddings whose gradient is not ∇L
class Bag(nn.Module):
    def __init__(self, **embedding) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.out = nn.Embedding(5, 3, **embedding), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc(self.emb(x.long()).mean(1))))


@pytest.mark.parametrize("option", [{"padding_idx": 0}, {"scale_grad_by_freq": True}], ids=["padding_idx", "scale_grad_by_freq"])
def test_embedding_whose_gradient_is_not_the_loss_gradient(option):
    (name,) = option
    with pytest.warns(UserWarning, match=f"emb \\(Embedding\\): {name}"):
        laws = checked(Bag(**option), *tokens())
    assert kinds(laws) == [("rescale", "fc|out", 3), ("translation", "out", 4)]
    assert kinds(checked(Bag(), *tokens()))[:2] == [("rescale", "emb|fc", 3), ("linear", "emb|fc", 6)]  # without the option


# ------------------------------------------------------------------------ 6. one parameter-free module used twice
def test_one_relu_reused_by_several_layers():
    """Its laws are those of separate ReLUs, and no warning."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 3), relu, nn.Linear(3, 3), relu, nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        laws = checked(model, *vectors())
    assert kinds(laws) == MLP_LAWS


# ------------------------------------------------------------------------ random models
D = 3
PARTS = ("linear", "relu", "norm", "group", "residual", "cat", "train_only", "twice")


class Residual(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, D), act, nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Cat(nn.Module):
    """c(cat([act(a(x)), b(x)])): a rescale law through the concatenation."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.act, self.b, self.c = nn.Linear(D, D), act, nn.Linear(D, 2), nn.Linear(D + 2, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.cat([self.act(self.a(x)), self.b(x)], dim=-1))


class TrainTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh() if self.training else x


class Twice(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(D, D), act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.fc(x)))


class Composed(nn.Module):
    """Linear(4→D), the parts in order, ReLU, Linear(D→3); ReLUs shared or one per use."""

    def __init__(self, parts: list[str], shared: bool) -> None:
        super().__init__()
        relu = nn.ReLU()

        def act() -> nn.Module:
            return relu if shared else nn.ReLU()

        build = {
            "linear": lambda: nn.Linear(D, D),
            "relu": act,
            "norm": lambda: nn.LayerNorm(D, eps=0.0),
            "group": lambda: nn.GroupNorm(1, D, eps=0.0),
            "residual": lambda: Residual(act()),
            "cat": lambda: Cat(act()),
            "train_only": TrainTanh,
            "twice": lambda: Twice(act()),
        }
        self.inp = nn.Linear(4, D)
        self.parts = nn.ModuleList(build[p]() for p in parts)
        self.act, self.out = act(), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for part in self.parts:
            h = part(h)
        return self.out(self.act(h))


def tie(model: nn.Module, pairs: list[tuple[int, int]]) -> None:
    """Give pairs of D×D Linears (or of LayerNorms, of GroupNorms) one weight, indices taken modulo their number."""
    for kind in (nn.Linear, nn.LayerNorm, nn.GroupNorm):
        group = [m for m in model.modules() if isinstance(m, kind) and m.weight.shape[-1] == D and m.weight.shape[0] == D]
        for i, j in pairs:
            if len(group) > 1 and group[i % len(group)] is not group[j % len(group)]:
                group[j % len(group)].weight = group[i % len(group)].weight


HOOKS = {
    "forward": lambda m: m.register_forward_hook(shift_output),
    "pre": lambda m: m.register_forward_pre_hook(shift_input),
    "instance": lambda m: setattr(m, "forward", types.MethodType(shifted_forward, m)),
}


@st.composite
def composed(draw) -> tuple[nn.Module, bool]:
    """A random model, and whether it is left in eval mode."""
    parts = draw(st.lists(st.sampled_from(PARTS), min_size=1, max_size=4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Composed(parts, shared=draw(st.booleans()))
    tie(model, draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=2)))
    leaves = [m for m in model.modules() if not isinstance(m, (Composed, nn.ModuleList, Residual, Cat, Twice, TrainTanh))]
    for index, hook in draw(st.lists(st.tuples(st.integers(0, 99), st.sampled_from(sorted(HOOKS))), max_size=2)):
        HOOKS[hook](leaves[index % len(leaves)])
    evaluate = draw(st.booleans())
    return model.eval() if evaluate else model, evaluate


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(composed())
def test_every_law_of_a_random_model_is_kept_by_the_flow(case):
    """Linear, ReLU (shared or not), LayerNorm and GroupNorm (eps = 0), residual adds, a
    concatenation, a train-only tanh, a layer called twice, tied weights, hooks and instance
    forwards drawn at random: every detected law is orthogonal to the gradient flowsim
    integrates, and the model keeps its mode."""
    model, evaluate = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        checked(model, *vectors())
    assert model.training is not evaluate


# ------------------------------------------------------------------------ drift under gradient flow
RTOL, ATOL, T1 = 1e-10, 1e-12, 0.02


def drift_and_bound(model: nn.Module, laws: list[Law]) -> tuple[Tensor, Tensor]:
    """|Q(t1) − Q(0)| / scale of every component of `laws` under gradient flow (dopri5 at RTOL,
    ATOL, float64), and the bound the integrator's tolerance allows it.

    The exact flow keeps Q, so Q moves only by the error of each accepted step: Q(θ_k+1) −
    Q(φ_h(θ_k)) = ∇Q·e_k + O(|e_k|²) (Q at most quadratic, its Hessian of norm ≤ 2). dopri5
    accepts a step when the RMS over the P entries of e_i / (atol + rtol·|θ_i|) is ≤ 1, so
    |e_k| ≤ √P (atol + rtol·|θ|_∞) (e_k as the solver estimates it, the gap to its 4th-order
    embedded solution; the 5th-order one it keeps is closer to the flow); the update's
    rounding adds ε|θ| per step. Along the run |θ(t) − θ(0)| ≤ ∫|θ'| ≤ √(t1 (L(0) − L(t1)))
    (Cauchy–Schwarz, with dL/dt = −|θ'|²), which bounds |∇Q_c| by |∇Q_c(θ(0))| + 2·that and
    |θ|_∞ by |θ(0)|_∞ + that. Over n accepted
    steps: |ΔQ_c| ≤ n (G_c |e| + |e|²), plus the rounding of Q_c itself at both ends,
    roundoff(terms of Q_c) × its magnitude. These bounds are near 1e-9 here, the drifts of the
    detected laws below 1e-2 of them; a false law moves at the rate ⟨∇Q, ∇L⟩, by 1e-4 … 1e-3."""
    X, y = vectors()
    problem = fs.Problem(model, (X.double(), y))
    integrator = ODE("dopri5", rtol=RTOL, atol=ATOL)
    options = {"t1": T1, "save_every": T1, "laws": laws, "observe": ("loss", "params"), "progress": False}
    ds = fs.simulate(problem, fs.GradientFlow(), integrator, **options)
    assert ds.attrs["status"] == "completed", ds.attrs["status_message"]
    theta0 = torch.as_tensor(ds.params.values[0])
    theta1 = torch.as_tensor(ds.params.values[-1])
    travel = math.sqrt(T1 * max(float(ds.loss[0] - ds.loss[-1]), 0.0))
    law_set = LawSet(laws, problem.names, problem.shapes)
    steps = int(ds.step[-1])
    error = math.sqrt(problem.n_params) * (ATOL + RTOL * (float(theta0.abs().max()) + travel))
    error += torch.finfo(torch.float64).eps * (float(theta0.norm()) + travel)
    gradient = law_set.jacobian(theta0).norm(dim=1) + 2 * travel
    terms = (law_set.jacobian(torch.ones_like(theta0)) != 0).sum(1)
    magnitude = torch.maximum(law_set.magnitude(theta0), law_set.magnitude(theta1))
    scale = torch.as_tensor(ds.scale.values).where(torch.as_tensor(ds.scale.values) > 0, torch.ones(()))
    bound = (steps * (gradient * error + error**2) + 2 * roundoff(n_ops=terms) * magnitude) / scale
    drift = torch.as_tensor(abs(ds.flowsim.drift()).isel(time=-1).values)
    return drift, bound


def test_the_drift_bound_catches_a_false_law():
    """The bound is not vacuous: the MLP's first rescale law with its consumer's term left out
    (|W1[j]|² + b1[j]², not a law) drifts far above it, its true laws below."""
    model = mlp().double()
    laws = fs.laws.detect(model, inputs=vectors()[0][:2].double())
    rescale = laws[0]
    false = Law(rescale.kind, "false", tuple(g[:-1] for g in rescale.groups), rescale.components)
    drift, bound = drift_and_bound(model, [*laws, false])
    true_part = sum(law.size for law in laws)
    assert bool((drift[:true_part] <= bound[:true_part]).all()), (drift, bound)
    assert bool((drift[true_part:] > 100 * bound[true_part:]).all()), (drift, bound)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(composed())
def test_every_exact_law_of_a_random_model_is_conserved_by_gradient_flow(case):
    """The same random models, integrated by gradient flow to t1 = 0.02 (dopri5, rtol 1e-10,
    atol 1e-12, float64): every detected exact law drifts by no more than the integrator's
    tolerance allows (``drift_and_bound``)."""
    model, _ = case
    model = model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        laws = [law for law in fs.laws.detect(model, inputs=vectors()[0][:2].double()) if law.exact]
    if not laws:
        return
    drift, bound = drift_and_bound(model, laws)
    labels = [label for law in laws for label in law.labels()]
    assert bool((drift <= bound).all()), [(label, float(d), float(b)) for label, d, b in zip(labels, drift, bound) if d > b]
