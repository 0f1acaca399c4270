"""DiscreteSGD is PyTorch's SGD, and its records obey the exact discrete recursions."""

import numpy as np
import pytest
import torch
from torch import nn

import flowsim as fs

from conftest import build_problem, gradient_condition, relative, roundoff, sum_lengths


def torch_sgd_losses(problem: fs.Problem, lr, steps, momentum=0.0, dampening=0.0, nesterov=False, batches=None):
    """The plain PyTorch loop: full-data loss before every step."""
    model = problem.model.double().train()
    X, y = problem.X.double(), problem.y
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=problem.weight_decay
    )
    losses = []
    for k in range(steps + 1):
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(X), y)))
        if k == steps:
            break
        index = slice(None) if batches is None else batches[k]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[index]), y[index]).backward()
        opt.step()
    return np.array(losses)


@pytest.mark.parametrize(
    "momentum, dampening, nesterov",
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)],
)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_full_batch_matches_torch_optim_sgd_at_every_step(momentum, dampening, nesterov, batch_norm):
    """The same modules, kernels and update formulas as torch.optim.SGD (measured: equal bit for
    bit on every CPU path tried). Not asserted bitwise: views of one flat θ sit at other
    addresses than separate parameters, and MKL (outside its CNR mode) and ATen's vector loops
    pick their kernels by alignment, so a step's gradient may round apart, by
    roundoff(sum_lengths, gradient_condition) (conftest), and a step's update by one more
    rounding; at worst these add up over the steps (GD at η‖H‖ < 1 does not amplify them).
    A different formula (momentum, dampening, Nesterov, weight decay) is off by ≥ 1e-4."""
    problem = build_problem("cnn", n=64, weight_decay=1e-2, batch_norm=batch_norm)
    dynamics = fs.DiscreteSGD(lr=0.2, momentum=momentum, dampening=dampening, nesterov=nesterov)
    steps = 25
    ds = fs.simulate(problem, dynamics, t1=steps * dynamics.time_step, save_every=dynamics.time_step, progress=False)
    assert list(ds.step.values) == list(range(steps + 1))
    reference = torch_sgd_losses(problem, 0.2, steps, momentum, dampening, nesterov)
    exact = problem.to(dtype=torch.float64)
    bound = roundoff(n_ops=steps * (sum_lengths(exact) + 1), cond=gradient_condition(exact, exact.initial_theta()))
    assert np.abs(ds.loss.values - reference).max() / np.abs(reference).max() < bound


def test_mini_batches_match_torch_optim_sgd_on_the_same_batches():
    problem = build_problem("mlp", n=100, weight_decay=1e-3)
    dynamics = fs.DiscreteSGD(lr=0.1, batch_size=32, momentum=0.5)
    steps = 10  # 4 batches per epoch (32, 32, 32, 4): crosses two epoch boundaries
    bound = problem.to(dtype=torch.float64)
    batches = [dynamics.batch(bound, k, seed=7) for k in range(steps)]
    assert [len(b) for b in batches[:4]] == [32, 32, 32, 4]
    assert sorted(torch.cat(batches[:4]).tolist()) == list(range(100))  # without replacement
    assert not torch.equal(batches[0], batches[4])  # a new order each epoch
    ds = fs.simulate(problem, dynamics, t1=steps * 0.1, save_every=0.1, seed=7, progress=False)
    reference = torch_sgd_losses(problem, 0.1, steps, momentum=0.5, batches=batches)
    # as test_full_batch_matches_torch_optim_sgd_at_every_step (measured: equal bit for bit)
    bound = roundoff(n_ops=steps * (sum_lengths(bound) + 1), cond=gradient_condition(bound, bound.initial_theta()))
    assert relative(torch.as_tensor(ds.loss.values), torch.as_tensor(reference)) < bound


@pytest.mark.parametrize(
    "name, args", [("mlp", {}), ("cnn", {}), ("cnn", {"batch_norm": True, "bn_eps": 1e-12})], ids=["mlp", "cnn", "cnn_bn"]
)
def test_exact_discrete_recursions(name, args):
    """No momentum, weight decay λ, mini-batches: translation s_{k+1} = (1−ηλ)s_k;
    scale and rescale h_{k+1} = (1−ηλ)² h_k + η² grad_sq_k (DESIGN §5), to 1e-10 of
    max(|value|, scale). Not a round-off bound: round-off alone (the update's rounding, ε|θ|
    per entry, and the forms', roundoff(n_c) of their magnitude) is ~1e-14 (measured ≤ 6e-16);
    BatchNorm's eps = 1e-12 breaks its scale laws at order eps/Var (measured 1.8e-12).

    A translation law's companion Σ_k g[k, j] = mean_i Σ_k (p_ik − y_ik) h_ij is 0 exactly,
    whatever the rounded h_ij and logits (Σ_k p_ik = 1 for any logits); computed, each entry
    g[k, j] carries the rounding of the softmax's K-term normalisation and of the mean over the
    examples, roundoff(N + K, gradient_condition)·|g|, and their sum roundoff(K) more:
    ≤ K·(both)·|g|, |g| ≤ |g_λ| + λ|θ| (a wrong companion, e.g. a square, is ~|g|²)."""
    lr, lam = 0.1, 5e-3
    problem = build_problem(name, n=96, weight_decay=lam, **args)
    dynamics, observe = fs.DiscreteSGD(lr=lr, batch_size=16), ("grad_norm", "params")
    ds = fs.simulate(problem, dynamics, t1=3.0, save_every=lr, seed=3, observe=observe, progress=False)
    value, grad_sq, scale = ds.value.values, ds.grad_sq.values, ds.scale.values
    linear = ds.law.values == "translation"
    quadratic = ~linear
    assert linear.any() and quadratic.any()
    predicted = np.where(linear, (1 - lr * lam) * value[:-1], (1 - lr * lam) ** 2 * value[:-1] + lr**2 * grad_sq[:-1])
    error = np.abs(predicted - value[1:]) / np.maximum(np.abs(value[1:]), scale)
    assert error.max() < 1e-10
    # the gradient companion of a translation law is Σ_k g[k, j] = 0, to round-off (docstring)
    exact = problem.to(dtype=torch.float64)
    g = float(ds.grad_norm.max()) + lam * float(np.linalg.norm(ds.params.values, axis=1).max())
    classes = 10
    entry = roundoff(n_ops=exact.n_examples + classes, cond=gradient_condition(exact, exact.initial_theta()))
    assert np.abs(grad_sq[:, linear]).max() < classes * (entry + roundoff(n_ops=classes)) * g


def test_same_seed_same_record_and_another_seed_differs():
    problem = build_problem("mlp", n=64)
    run = lambda seed: fs.simulate(
        problem, fs.DiscreteSGD(lr=0.1, batch_size=8), t1=1.0, save_every=0.1, seed=seed, progress=False
    )
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a.value.values, b.value.values)
    assert not np.array_equal(a.value.values, c.value.values)


def test_save_grid_in_whole_steps():
    problem = build_problem("mlp", n=32)
    ds = fs.simulate(problem, fs.DiscreteSGD(lr=0.03), t1=1.0, save_every=0.3, progress=False)
    assert list(ds.step.values) == [0, 10, 20, 30, 33]
    np.testing.assert_allclose(ds.time.values, ds.step.values * 0.03)
    assert list(ds.nfe.values) == [1, 11, 21, 31, 34]


def test_momentum_records_the_velocity_of_each_step():
    problem = build_problem("mlp", n=32)
    ds = fs.simulate(problem, fs.DiscreteSGD(lr=0.1, momentum=0.9), t1=1.0, save_every=0.1, observe=("params",), progress=False)
    # θ_{k+1} = θ_k − η v_{k+1}: a translation law moves by −η Σ_k v[k, j]. To round-off: the
    # law sums K = 10 entries (at both ends: 2·roundoff(K) of its magnitude), the update rounds
    # each entry once (K·ε of it) and ηΣv rounds as a sum of K terms: roundoff(4K) of the
    # magnitude Σ_k |W[k, j]| (with |ηv| ≤ |W|), at its largest over the run (a law moving by
    # another step's velocity is off by ~η|Δv| ≥ 1e-4)
    translation = (ds.law == "translation").values
    moved = ds.value.values[1:, translation] - ds.value.values[:-1, translation]
    law_set = fs.laws.LawSet(fs.laws.detect(problem.model), problem.names, problem.shapes)
    magnitude = law_set.magnitude(torch.as_tensor(ds.params.values).T).T[:, translation].max()
    assert np.abs(moved + 0.1 * ds.velocity_sq.values[:-1, translation]).max() < roundoff(n_ops=4 * 10) * float(magnitude)
    assert ds.params.shape == (11, problem.n_params) and ds.tensor.values[0] == "fc1.weight"


def test_diverging_sgd_keeps_what_it_saved():
    X, y = fs.data.teacher_student(n=32)
    torch.manual_seed(0)
    problem = fs.Problem(fs.models.mlp.mlp(in_features=16, out_features=1, depth=1, width=8), (X, y), loss="mse")
    with pytest.warns(RuntimeWarning, match="diverged"):
        ds = fs.simulate(problem, fs.DiscreteSGD(lr=5.0), t1=5.0 * 40, save_every=5.0, progress=False)
    assert ds.attrs["status"] == "diverged" and "non-finite" in ds.attrs["status_message"]
    assert "t=30" in ds.attrs["status_message"]  # when it diverged
    assert ds.sizes["time"] == 6 and np.isfinite(ds.value.values).all() and list(ds.step.values) == list(range(6))
