"""Attention, transformer and residual networks: the laws detected on the zoo and on a user's
own modules, their gradient-orthogonality, their conservation under gradient flow, and the
count of every law (flowsim.laws.counting) that shows the detected ones complete."""

import warnings

import pytest
import torch
from torch import nn

import flowsim as fs
from flowsim import data, models
from flowsim.cli import main
from flowsim.integrators import ODE
from flowsim.laws import gradient_check
from flowsim.models.resnet import ResidualBlock, ResidualMLPBlock

from conftest import orthogonality_bound


def kinds(laws):
    return [(law.kind, law.site, law.size) for law in laws]


def orthogonal(model, X, y, loss, tol=None, seed=0):
    """Detect the laws on a float64 copy and check ⟨∇Q, ∇L⟩ = 0 at a random θ, to round-off
    (conftest's orthogonality_bound, ~1e-13) or to `tol` where a law is approximate; the laws."""
    model = model.double()
    X = X.double() if X.is_floating_point() else X
    problem = fs.Problem(model, (X, y), loss=loss)
    laws = fs.laws.detect(model, loss=loss, inputs=X)
    theta = torch.randn(problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    worst = gradient_check(laws, problem, theta)
    tol = orthogonality_bound(problem, theta) if tol is None else tol
    assert float(worst.max()) < tol, [(law.kind, law.site) for law in laws]
    return laws


def count(model, X, loss, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fs.laws.count(model, X, loss=loss, **options)


SEQ = data.sequences(n=16, length=4, vocab=4)
DIGITS = data.digits(n_train=16)


def block_kinds(prefix="", stream=()):
    """A pre-norm block's laws; `stream`: the laws of its residual stream, after attn.v|attn.o
    (the block alone: Σ b_o − Σ b_fc2; in a transformer whose stream only LayerNorms read: the
    sums of each writer's bias and weight columns)."""
    p = prefix
    return [
        ("rescale", f"{p}ln1|{p}attn.q|{p}attn.k|{p}attn.v", 4),
        ("attention_qk", f"{p}attn.q|{p}attn.k", 6),
        ("translation", f"{p}attn.k", 4),
        ("rescale", f"{p}attn.v|{p}attn.o", 4),
        ("attention_vo", f"{p}attn.v|{p}attn.o", 6),
        *[law for law in stream if "fc2" not in law[1] or "-" in law[1]],
        ("rescale", f"{p}ln2|{p}fc1", 4),
        ("rescale", f"{p}fc1|{p}fc2", 4),
        *[law for law in stream if "fc2" in law[1] and "-" not in law[1]],
    ]


ZOO = {
    "attention.layer": (
        lambda: models.attention.layer(d_model=4, heads=2, bias=True, causal=True),
        "mse",
        [("attention_qk", "q|k", 6), ("translation", "k", 4), ("rescale", "v|o", 4), ("attention_vo", "v|o", 6)],
    ),
    "attention.block": (lambda: models.attention.block(d_model=4, heads=2, hidden=4), "mse", block_kinds(stream=[("translation", "attn.o-fc2", 1)])),
    "attention.transformer": (
        lambda: models.attention.transformer(vocab=4, length=4, width=4, heads=2, hidden=4, num_classes=4),
        "cross_entropy",
        [("translation", "embed", 4), ("translation", "pos", 4)]
        + block_kinds(
            "blocks.0.",
            [("translation", f"blocks.0.{w}", n) for w in ("attn.o", "fc2") for n in (1, 4)],
        )
        + [("rescale", "norm|head", 4), ("translation", "head", 5)],
    ),
    "resnet.resnet": (
        lambda: models.resnet.resnet(width=2, stages=2),
        "cross_entropy",
        [
            ("rescale", "stem.conv+stage0.block0.conv2|stage0.block0.conv1|stage1.block0.conv1|stage1.block0.shortcut.0", 2),
            ("rescale", "stage0.block0.conv1|stage0.block0.conv2", 2),
            ("rescale", "stage1.block0.conv1|stage1.block0.conv2", 4),
            ("rescale", "stage1.block0.conv2+stage1.block0.shortcut.0|fc", 4),
            ("translation", "stage1.block0.conv2-stage1.block0.shortcut.0", 4),
            ("translation", "fc", 5),
        ],
    ),
    "resnet.resnet-bn": (
        lambda: models.resnet.resnet(width=2, stages=2, batch_norm=True, bn_eps=1e-12),
        "cross_entropy",
        [
            ("scale", "stem.conv", 2),
            ("translation", "stem.conv", 2),  # a conv bias before a BatchNorm: each entry
            ("rescale", "stem.bn+stage0.block0.bn2|stage0.block0.conv1|stage1.block0.conv1|stage1.block0.shortcut.0", 2),
            ("scale", "stage0.block0.conv1", 2),
            ("translation", "stage0.block0.conv1", 2),
            ("rescale", "stage0.block0.bn1|stage0.block0.conv2", 2),
            ("scale", "stage0.block0.conv2", 2),
            ("translation", "stage0.block0.conv2", 2),
            ("scale", "stage1.block0.conv1", 4),
            ("translation", "stage1.block0.conv1", 4),
            ("rescale", "stage1.block0.bn1|stage1.block0.conv2", 4),
            ("scale", "stage1.block0.conv2", 4),
            ("translation", "stage1.block0.conv2", 4),
            ("rescale", "stage1.block0.bn2+stage1.block0.shortcut.1|fc", 4),
            ("translation", "stage1.block0.bn2-stage1.block0.shortcut.1", 4),
            ("scale", "stage1.block0.shortcut.0", 4),
            ("translation", "stage1.block0.shortcut.0", 4),
            ("translation", "fc", 5),
        ],
    ),
    "resnet.residual_mlp": (
        lambda: models.resnet.residual_mlp(width=4, hidden=3),
        "cross_entropy",
        [
            ("rescale", "inp+block1.fc2+block2.fc2|block1.fc1|block2.fc1|out", 4),
            ("rescale", "block1.fc1|block1.fc2", 3),
            ("rescale", "block2.fc1|block2.fc2", 3),
            ("translation", "out", 5),
        ],
    ),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_gets_its_laws_and_each_is_orthogonal_to_the_gradient(name):
    """The exact list of laws (the residual stream's own laws included: its rescale law, and
    the shifts that LayerNorms or cancelling biases ignore) and |⟨∇Q, ∇L⟩| / (|∇Q| |∇L|) at
    round-off (orthogonality_bound) at random θ and data (BatchNorm eps = 1e-12 breaks its
    scale laws at order eps/Var, not round-off: < 1e-8)."""
    build, loss, expected = ZOO[name]
    torch.manual_seed(0)
    if name.startswith("attention"):
        X, y = (SEQ[0], SEQ[1]) if loss == "cross_entropy" else (torch.randn(16, 4, 4), torch.randn(16, 4, 4))
    else:
        X, y = DIGITS
    laws = orthogonal(build(), X, y, loss, tol=1e-8 if "bn" in name else None)
    assert kinds(laws) == expected


class Residual(nn.Module):
    """A user's own skip connection."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class SelfAttention(nn.Module):
    """A user's classifier around nn.MultiheadAttention (packed in_proj_weight)."""

    def __init__(self, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, bias=bias, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


def test_a_users_sequential_with_its_own_residual_wrapper():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), Residual(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))), nn.ReLU(), nn.Linear(5, 10)
    )
    torch.manual_seed(0)
    laws = orthogonal(model, *DIGITS, "cross_entropy")
    # inside the wrapper the ReLU pair; across the skip the stream's rescale law (writers 1 and 3.inner.2, readers 3.inner.0 and 5)
    assert kinds(laws) == [("rescale", "1+3.inner.2|3.inner.0|5", 5), ("rescale", "3.inner.0|3.inner.2", 3), ("translation", "5", 6)]


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_split_per_head(bias):
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, 4), torch.randint(3, (16,))
    laws = orthogonal(SelfAttention(bias), X, y, "cross_entropy")
    expected = [("attention_qk", "attn", 6), ("rescale", "attn", 4), ("attention_vo", "attn", 6)]
    expected += [("translation", "attn", 4)] if bias else []
    assert kinds(laws) == expected + [("rescale", "attn|head", 4), ("linear", "attn|head", 10), ("translation", "head", 5)]
    qk = laws[0]
    assert qk.components[0] == "head 0 (0,0)" and qk.components[3] == "head 1 (0,0)"
    # the same laws as attention written out: per head d_h(d_h+1)/2 query–key components
    assert {t.part for g in qk.groups for t in g} == {(0, 0, 2), (0, 4, 6), (0, 2, 4), (0, 6, 8)}
    if not bias:
        result = count(SelfAttention(bias), X, "cross_entropy")
        assert result.complete and result.n_laws == result.n_known == 27


def test_modules_flowsim_cannot_analyse():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, g):
            return g

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(Square.apply(self.fc1(x)))

    with pytest.raises(fs.ModelError, match="custom autograd function Square"):
        fs.laws.detect(Custom())
    fs.laws.detect(models.mlp.mlp(in_features=4, out_features=2))  # Function.apply restored

    class Opaque(nn.Module):  # a parametrised leaf flowsim does not know: a warning, no law through it
        def __init__(self):
            super().__init__()
            self.fc1, self.gru, self.fc2 = nn.Linear(4, 3), nn.GRUCell(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.gru(torch.relu(self.fc1(x)))))

    with pytest.warns(UserWarning, match="does not look inside gru"):
        laws = fs.laws.detect(Opaque(), inputs=torch.randn(2, 4))
    assert kinds(laws) == [("translation", "fc2", 4)]


# ------------------------------------------------------------------------------------ counts
def relu_pair(r, skip=False):
    return Residual(nn.Sequential(nn.Linear(3, r), nn.ReLU(), nn.Linear(r, 3))) if skip else nn.Sequential(nn.Linear(3, r), nn.ReLU(), nn.Linear(r, 3))


@pytest.mark.parametrize(
    "case, build, X, expected",
    [
        ("ReLU pair r=3", lambda: relu_pair(3), (8, 3), 3),
        ("residual ReLU pair r=3", lambda: relu_pair(3, skip=True), (8, 3), 3),
        ("linear pair r=3", lambda: nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 4, bias=False)), (8, 4), 6),
        ("one head d_h=2", lambda: models.attention.layer(d_model=3, heads=1, head_dim=2), (8, 3, 3), 2 * 3),
        ("two heads d_h=2", lambda: models.attention.layer(d_model=3, heads=2, head_dim=2), (8, 3, 3), 2 * 2 * 3),
        ("residual MLP block", lambda: ResidualMLPBlock(3, 2), (8, 3), 2),
        ("residual conv block", lambda: ResidualBlock(2, 2), (8, 2, 4, 4), 2),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_counts_and_complete(case, build, X, expected):
    """D − dim Lie(W)(θ): r for a ReLU pair, r(r+1)/2 for a linear pair, d_h(d_h+1) per head;
    a residual block the count of the block without its skip; all detected (complete)."""
    torch.manual_seed(0)
    result = count(build(), torch.randn(*X), "mse")
    assert (result.n_laws, result.n_known, result.complete) == (expected, expected, True), (case, result)


def test_count_finds_what_detection_misses_and_gives_bounds_for_large_models():
    torch.manual_seed(0)
    # a residual MLP has a rescale law per unit of its residual stream (across the skips): detected too
    model = models.resnet.residual_mlp(depth=2, width=4, hidden=3)
    result = count(model, DIGITS[0], "cross_entropy")
    assert (result.n_laws, result.n_known, result.complete) == (3 + 3 + 5 + 4, 3 + 3 + 5 + 4, True)
    # too many parameters: no brackets, the bounds and a warning
    with pytest.warns(UserWarning, match="bounds only"):
        bounds = fs.laws.count(models.attention.layer(d_model=4, heads=2), torch.randn(8, 3, 4), loss="mse", max_params=10)
    assert bounds.n_laws is None and bounds.lie_rank is None and bounds.n_known == 12 and bounds.first_order_bound >= 12
    assert bounds.complete is None


FLOWS = {
    "attention.layer": (lambda: models.attention.layer(d_model=4, heads=2, bias=True), "mse", {"attention_qk", "attention_vo", "rescale", "translation"}),
    "attention.transformer": (
        lambda: models.attention.transformer(vocab=4, length=4, width=4, hidden=4, num_classes=4, activation="identity"),
        "cross_entropy",
        {"attention_qk", "attention_vo", "rescale", "linear", "translation"},
    ),
    "resnet.residual_mlp": (lambda: models.resnet.residual_mlp(in_features=16, width=4, hidden=3, activation="identity"), "cross_entropy", {"rescale", "linear", "translation"}),
    "resnet.resnet": (
        lambda: models.resnet.resnet(width=2, batch_norm=True, activation="identity", bn_eps=1e-12),
        "cross_entropy",
        {"scale", "rescale", "translation"},
    ),
}


@pytest.mark.parametrize("name", list(FLOWS))
def test_laws_conserved_under_gradient_flow(name):
    """dopri5 at rtol=atol=1e-10, float64, to t=1: every law within 1e-7 relative (the ResNet
    with BatchNorm at eps 1e-12). Linear activations (ReLU flows are non-smooth and crawl at
    this tolerance: README)."""
    build, loss, expected = FLOWS[name]
    if name.startswith("attention"):
        X, y = data.sequences(n=16, length=4, vocab=4, task="regression" if loss == "mse" else "classification")
    elif name == "resnet.resnet":
        X, y = DIGITS
    else:
        X, y = DIGITS[0].flatten(1)[:, ::4], DIGITS[1]
    torch.manual_seed(0)
    problem = fs.Problem(build(), (X, y), loss=loss)
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-10, atol=1e-10), t1=1.0, save_every=1.0, dtype=torch.float64, progress=False)
    assert ds.attrs["status"] == "completed" and float(ds.loss[-1]) < 0.95 * float(ds.loss[0])
    assert set(ds.law.values) == expected
    assert float(abs(ds.flowsim.drift()).max()) < 1e-7


def test_laws_command_prints_the_table_and_the_count(tmp_path, capsys):
    config = tmp_path / "attention.toml"
    config.write_text(
        '[model]\nname = "attention.layer"\nheads = 2\nbias = false\n[data]\nname = "sequences"\nn = 16\nlength = 3\nvocab = 4\n'
        'task = "regression"\n[problem]\nloss = "mse"\n[dynamics]\nname = "GradientFlow"\n[run]\nt1 = 1.0\nsave_every = 0.5\n'
    )
    assert main(["laws", str(config)]) == 0
    out = capsys.readouterr().out
    assert "attention_qk" in out and "attention_vo" in out and "q|k" in out
    assert "laws        12" in out and "complete    True" in out
    assert main(["laws", str(tmp_path / "missing.toml")]) == 2
