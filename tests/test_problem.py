"""Problem: flat views, gradients, Hessian-vector products, weighted and chunked evaluation.

Where a loss or gradient is compared with another evaluation of it (plain autograd, a weighted
sum, chunks), the two may sum in other orders: chunks and weights reorder the mean over the
examples, and even the same kernels on the same numbers may round apart when MKL picks its
kernel by the operands' alignment (views of one flat θ against separate parameters). Bound:
roundoff(n_ops = sum_lengths(problem), cond), the lengths of the sums along the network, with
cond = 1 for a loss (a mean of positive terms) and gradient_condition (the cancellation of the
mean over examples) for a gradient: ~3e-13 (MLP) to ~8e-12 (CNN: its weight gradients sum over
N·H·W terms). A wrong example, weight or parameter slot is off by O(1/N) or more."""

import pytest
import torch
from torch import nn

import flowsim as fs
from flowsim import data, models

from conftest import build_problem, gradient_condition, relative, roundoff, sum_lengths


def plain_loss_and_grad(model: nn.Module, X, y):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_bn"])
def test_loss_and_grad_match_plain_autograd(kind):
    args = {"batch_norm": True} if kind == "cnn_bn" else {}
    problem = build_problem("mlp" if kind == "mlp" else "cnn", **args).to(dtype=torch.float64)
    theta = problem.initial_theta()
    model = problem.model.double().train()
    loss, grad = problem.loss_and_grad(theta)
    ref_loss, ref_grad = plain_loss_and_grad(model, problem.X, problem.y)
    # the same kernels in the same order (measured: equal bit for bit); see the module docstring
    loss_bound = roundoff(n_ops=sum_lengths(problem))
    grad_bound = roundoff(n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta))
    assert relative(loss, ref_loss) < loss_bound
    assert relative(grad, ref_grad) < grad_bound
    # a mini-batch
    index = torch.arange(5, 37)
    loss_b, grad_b = problem.loss_and_grad(theta, index)
    ref_b, ref_grad_b = plain_loss_and_grad(model, problem.X[index], problem.y[index])
    assert relative(loss_b, ref_b) < loss_bound and relative(grad_b, ref_grad_b) < grad_bound


def test_unflatten_gives_views_and_evaluation_leaves_the_users_model_alone():
    problem = build_problem("mlp")
    before = [p.detach().clone() for p in problem.model.parameters()]
    theta = problem.initial_theta().double()
    views = problem.unflatten(theta)
    assert all(v.untyped_storage().data_ptr() == theta.untyped_storage().data_ptr() for v in views.values())
    problem.to(dtype=torch.float64).loss_and_grad(theta + 1.0)
    problem.loss_and_grad((theta + 1.0).float())
    assert all(torch.equal(a, b) for a, b in zip(before, problem.model.parameters()))


def test_batchnorm_uses_batch_statistics_and_mutates_no_buffer():
    problem = build_problem("cnn", batch_norm=True).to(dtype=torch.float64)
    bn = problem.model.features.bn1
    running = bn.running_mean.clone()
    theta = problem.initial_theta()
    loss, _ = problem.loss_and_grad(theta)
    assert torch.equal(bn.running_mean, running) and int(bn.num_batches_tracked) == 0
    # training-mode statistics of the evaluated examples, as a plain forward computes them
    model = problem.model.train()
    bound = roundoff(n_ops=sum_lengths(problem))  # a loss: see the module docstring
    assert relative(loss, nn.functional.cross_entropy(model(problem.X), problem.y)) < bound
    # a mini-batch normalises with its own statistics: not a slice of the full-batch output
    index = torch.arange(16)
    assert relative(problem.loss(theta, index), nn.functional.cross_entropy(model(problem.X[index]), problem.y[index])) < bound


def test_hvp_matches_finite_differences_of_the_gradient():
    problem = build_problem("mlp", n=32, activation="tanh").to(dtype=torch.float64)
    theta = problem.initial_theta()
    v = torch.randn_like(theta, generator=torch.Generator().manual_seed(1))
    h = 1e-5
    fd = (problem.loss_and_grad(theta + h * v)[1] - problem.loss_and_grad(theta - h * v)[1]) / (2 * h)
    assert relative(problem.hvp(theta, v), fd) < 1e-7


def test_weighted_grad_is_the_gradient_of_the_reweighted_loss():
    problem = build_problem("mlp", n=32).to(dtype=torch.float64)
    theta = problem.initial_theta()
    uniform = torch.full((32,), 1 / 32, dtype=torch.float64)
    bound = roundoff(n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta))  # module docstring
    assert relative(problem.weighted_grad(theta, uniform), problem.loss_and_grad(theta)[1]) < bound
    one_hot = torch.zeros(32, dtype=torch.float64)
    one_hot[3] = 1.0
    assert relative(problem.weighted_grad(theta, one_hot), problem.loss_and_grad(theta, torch.tensor([3]))[1]) < bound


def test_chunked_full_batch_equals_one_pass():
    X, y = data.digits(n_train=100)
    torch.manual_seed(0)
    model = models.mlp.mlp(depth=1, width=8)
    one = fs.Problem(model, (X, y)).to(dtype=torch.float64)
    chunked = fs.Problem(model, (X, y), chunk_size=30).to(dtype=torch.float64)
    theta = one.initial_theta()
    # the chunks reorder the mean over the 100 examples: module docstring
    grad_bound = roundoff(n_ops=sum_lengths(one), cond=gradient_condition(one, theta))
    assert relative(chunked.loss_and_grad(theta)[1], one.loss_and_grad(theta)[1]) < grad_bound
    assert relative(chunked.loss(theta), one.loss(theta)) < roundoff(n_ops=sum_lengths(one))
    with pytest.raises(fs.ModelError, match="chunk_size"):
        fs.Problem(models.cnn.vgg(batch_norm=True), data.digits(n_train=10), chunk_size=4)


def test_mse_loss_matches_pytorch():
    X, y = data.teacher_student(n=40, out_features=3)
    torch.manual_seed(0)
    model = models.mlp.mlp(in_features=16, out_features=3, depth=1, width=8)
    problem = fs.Problem(model, (X, y), loss="mse").to(dtype=torch.float64)
    loss = problem.loss(problem.initial_theta())
    # a mean of N·3 squares (positive terms) after the forward sums: module docstring
    bound = roundoff(n_ops=sum_lengths(problem) + 3 * problem.n_examples)
    assert relative(loss, nn.functional.mse_loss(problem.model.double()(X.double()), y.double())) < bound


def test_data_sets():
    X, y = data.digits()
    assert X.shape == (1797, 1, 8, 8) and y.shape == (1797,) and int(y.max()) == 9
    # standardised in float64, then each pixel rounded to float32 (by ≤ u₃₂|x|, u₃₂ = ε₃₂/2): that
    # moves the mean by ≤ u₃₂·mean|x| and the std by ≤ u₃₂·rms(x) = u₃₂. Checked in float64, whose
    # own sums over the n pixels add roundoff(float64, n) (a float32 mean of 115,008 values could
    # be off by far more than ε₃₂); a missed standardisation is off by O(1)
    x = X.double()
    assert abs(float(x.mean())) < torch.finfo(torch.float32).eps / 2 * float(x.abs().mean()) + roundoff(n_ops=x.numel())
    assert abs(float(x.std()) - 1) < torch.finfo(torch.float32).eps / 2 + roundoff(n_ops=x.numel(), cond=2)
    Xa, _ = data.digits(n_train=100, seed=3)
    Xb, _ = data.digits(n_train=100, seed=3)
    assert Xa.shape[0] == 100 and torch.equal(Xa, Xb)
    Xc, yc = data.teacher_student(n=50, out_features=4, task="classification")
    assert Xc.shape == (50, 16) and yc.dtype == torch.long and int(yc.max()) <= 3
