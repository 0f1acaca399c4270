"""Law detection from the module graph, and the gradient-orthogonality of every detected law."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flowsim as fs
from flowsim import data, models
from flowsim.laws import LawSet, gradient_check

from conftest import orthogonality_bound, roundoff


def kinds(laws):
    return [(law.kind, law.site, law.size) for law in laws]


def check_orthogonal(model, X, y, loss="cross_entropy", tol=None):
    """Every law's gradient is orthogonal to the loss gradient at random θ (float64): to
    `orthogonality_bound`, or to `tol` where the law holds only approximately (BatchNorm)."""
    problem = fs.Problem(model.double(), (X.double(), y), loss=loss)
    laws = fs.laws.detect(model, loss=loss)
    assert laws, "expected laws"
    theta = torch.randn(problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    worst = gradient_check(laws, problem, theta)
    tol = orthogonality_bound(problem, theta) if tol is None else tol
    assert worst.max() < tol, worst.max()
    return laws


def test_mlp_laws():
    laws = fs.laws.detect(models.mlp.mlp(depth=2, width=5))
    assert kinds(laws) == [("rescale", "fc1|fc2", 5), ("rescale", "fc2|out", 5), ("translation", "out", 6)]
    assert laws[2].components[-1] == "bias" and all(law.exact for law in laws)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_laws_are_orthogonal_to_the_gradient(activation, bias):
    X, y = data.digits(n_train=40)
    torch.manual_seed(0)
    laws = check_orthogonal(models.mlp.mlp(depth=2, width=6, activation=activation, bias=bias), X, y)
    # with no nonlinearity between two layers the whole matrix law is found beside the rescale law
    linear = {"linear"} if activation == "identity" else set()
    assert {law.kind for law in laws} == {"rescale", "translation"} | linear


def test_vgg_laws_with_and_without_batchnorm():
    plain = fs.laws.detect(models.cnn.vgg(depth=3, width=4))
    assert kinds(plain) == [
        ("rescale", "features.conv1|features.conv2", 4),
        ("rescale", "features.conv2|features.conv3", 4),
        ("rescale", "features.conv3|classifier.fc", 4),
        ("translation", "classifier.fc", 4 * 4 * 4 + 1),
    ]
    bn = fs.laws.detect(models.cnn.vgg(depth=2, width=3, batch_norm=True))
    assert kinds(bn) == [
        ("scale", "features.conv1", 3),
        ("translation", "features.conv1", 3),  # a conv bias before a BatchNorm: each entry conserved
        ("rescale", "features.bn1|features.conv2", 3),
        ("scale", "features.conv2", 3),
        ("translation", "features.conv2", 3),
        ("rescale", "features.bn2|classifier.fc", 3),
        ("translation", "classifier.fc", 3 * 4 * 4 + 1),
    ]
    scale = [law for law in bn if law.kind == "scale"]
    assert all(not law.exact and law.eps == 1e-5 for law in scale)
    assert all(law.exact for law in bn if law.kind != "scale")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_laws_are_orthogonal_to_the_gradient(batch_norm):
    X, y = data.digits(n_train=40)
    torch.manual_seed(0)
    model = models.cnn.vgg(depth=3, width=4, batch_norm=batch_norm, bn_eps=1e-12)
    # BatchNorm's eps = 1e-12 breaks its scale laws at order eps/Var (not round-off): 1e-10
    check_orthogonal(model, X, y, tol=1e-10 if batch_norm else None)


def test_mse_has_no_translation_law():
    laws = fs.laws.detect(models.mlp.mlp(depth=1, width=4), loss="mse")
    assert [law.kind for law in laws] == ["rescale"]


class OwnNet(nn.Module):
    """Written with functional calls and a view, not from the zoo."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.max_pool2d(torch.relu(self.b(x)), 2)
        return self.head(x.view(x.size(0), -1))


def test_a_users_own_modules_get_the_same_laws():
    X, y = data.digits(n_train=40)
    torch.manual_seed(0)
    laws = check_orthogonal(OwnNet(), X, y)
    assert kinds(laws) == [("rescale", "a|b", 3), ("rescale", "b|head", 5), ("translation", "head", 81)]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.LeakyReLU(0.1), nn.Linear(7, 10))
    laws = check_orthogonal(seq, X, y)
    assert kinds(laws) == [("rescale", "1|3", 7), ("translation", "3", 8)]


class BiasAfterReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 6), nn.Linear(6, 10)
        self.shift = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))) + self.shift)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 6)
        self.fc1, self.fc2, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(torch.relu(h))


def test_broken_symmetries_make_no_law():
    # a bias added after the ReLU breaks the rescale symmetry of fc1|fc2
    assert kinds(fs.laws.detect(BiasAfterReLU())) == [("translation", "fc2", 7)]
    # tanh is not positively homogeneous
    assert [law.kind for law in fs.laws.detect(models.mlp.mlp(activation="tanh"))] == ["translation"]
    # a residual block keeps its inner law, and its stream (written by inp and fc2, read by fc1 and out) has its own
    X, y = data.digits(n_train=40)
    torch.manual_seed(0)
    laws = check_orthogonal(Residual(), X, y)
    assert kinds(laws) == [("rescale", "inp+fc2|fc1|out", 6), ("rescale", "fc1|fc2", 6), ("translation", "out", 7)]


def test_a_model_that_cannot_be_traced_is_a_model_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(fs.ModelError, match="trace"):
        fs.laws.detect(Branchy())


def test_law_values_and_magnitudes():
    model = models.mlp.mlp(depth=1, width=3, in_features=2, out_features=2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape) - 1)
    params = dict(model.named_parameters())
    rescale, translation = fs.laws.detect(model)
    W1, b1, W2 = params["fc1.weight"], params["fc1.bias"], params["out.weight"]
    expected = (W1**2).sum(1) + b1**2 - (W2**2).sum(0)
    assert torch.equal(rescale.value(params), expected)
    assert torch.equal(rescale.magnitude(params), (W1**2).sum(1) + b1**2 + (W2**2).sum(0))
    assert torch.equal(translation.value(params), torch.cat([W2.sum(0), params["out.bias"].sum()[None]]))
    names = list(params)
    law_set = LawSet([rescale, translation], names, [params[n].shape for n in names])
    assert law_set.size == 3 + 4 and law_set.coords()["quantity"][0] == "rescale:fc1|out:unit 0"
    theta = torch.cat([params[n].reshape(-1) for n in names])
    assert torch.equal(law_set.value(theta), torch.cat([expected, translation.value(params)]))
    # columns of a (P, K) matrix are evaluated together
    both = law_set.value(torch.stack([theta, 2 * theta], 1))
    assert torch.equal(both[:, 0], law_set.value(theta)) and torch.allclose(both[3:, 1], 2 * both[3:, 0])


ROW_MODELS = {
    "mlp": (lambda: models.mlp.mlp(depth=2, width=6), True),
    "mlp_leaky_no_bias": (lambda: models.mlp.mlp(depth=3, width=5, activation="leaky_relu", bias=False), True),
    "vgg_batch_norm": (lambda: models.cnn.vgg(depth=2, width=4, batch_norm=True), True),
    "vgg_max_pool": (lambda: models.cnn.vgg(depth=3, width=3), True),
    "attention": (lambda: models.attention.layer(d_model=8, heads=2, bias=True), False),
}


@pytest.mark.parametrize("name", ROW_MODELS)
def test_rows_equal_the_sparse_products(name):
    """LawSet.rows (dense reductions of parameter views where the laws allow, the sparse
    matrices otherwise) equals LawSet.value on each row, float64, to round-off: the same n_c
    monomials of a component summed in two orders, within roundoff(n_c + 2) of their magnitude
    (LawSet.magnitude), entry by entry (a lost or doubled term is off by a whole monomial)."""
    build, dense = ROW_MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    named = dict(model.named_parameters())
    law_set = LawSet(fs.laws.detect(model), list(named), [p.shape for p in named.values()])
    assert (law_set._reductions is not None) == dense and law_set.size > 0
    rows = torch.randn(4, law_set.n_params, dtype=torch.float64)
    expected = torch.stack([law_set.value(row) for row in rows])
    terms = (law_set.jacobian(torch.ones(law_set.n_params, dtype=torch.float64)) != 0).sum(1)  # n_c
    allowed = roundoff(n_ops=terms + 2) * law_set.magnitude(rows.T).T  # + the squares' and the groups' roundings
    worst = float(((law_set.rows(rows) - expected).abs() / allowed).max())
    assert worst < 1, worst
    # the rows of a view into a larger block (a storage offset, a row stride), and of a block of
    # another shape after it: the same numbers, bit for bit (the reductions read views by offset)
    block = torch.randn(7, law_set.n_params + 3, dtype=torch.float64)
    view = block[2:5, 3:]
    assert torch.equal(law_set.rows(view), law_set.rows(view.clone()))
    assert torch.equal(law_set.rows(rows[:2]), law_set.rows(rows)[:2])
