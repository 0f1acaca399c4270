"""PyTorch's own nn.TransformerEncoderLayer and nn.TransformerEncoder: torch.fx cannot trace
their forward (its fast-path checks branch on the input), so detection traces the path that
forward takes in training mode, as Problem runs the model, and checks numerically that the
graph computes what the module does. Every law is checked against the gradient (float64,
random θ) and the count of every law agrees with the detected ones at three points."""

import warnings

import pytest
import torch
from torch import nn

import flowsim as fs
from flowsim.laws import detection

from conftest import checked_laws


def kinds(laws):
    return [(law.kind, law.site, law.size) for law in laws]


def checked(model, X, loss="mse"):
    return checked_laws(model, X, loss)


def layer(norm_first, **options):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(4, 2, dim_feedforward=2, dropout=0.0, batch_first=True, norm_first=norm_first, **options)


ATTENTION = [
    ("attention_qk", "self_attn", 6),
    ("rescale", "self_attn", 4),
    ("attention_vo", "self_attn", 6),
    ("translation", "self_attn", 4),
]
EXPECTED = {
    # pre-norm: x + sa(norm1(x)), then + ff(norm2(x)); the output bias sums of the two branches
    # cancel where they meet (norm2 ignores a shift constant over the units)
    True: [
        ("rescale", "norm1|self_attn", 4),
        *ATTENTION,
        ("translation", "self_attn.out_proj-linear2", 1),
        ("rescale", "norm2|linear1", 4),
        ("rescale", "linear1|linear2", 2),
    ],
    # post-norm: norm1(x + sa(x)), then norm2(x + ff(x)): each branch's output is read through
    # a LayerNorm only, so its bias sum and weight column sums are conserved
    False: [
        *ATTENTION,
        ("translation", "self_attn.out_proj", 1),
        ("translation", "self_attn.out_proj", 4),
        ("rescale", "linear1|linear2", 2),
        ("translation", "linear2", 1),
        ("translation", "linear2", 2),
    ],
}


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_transformer_encoder_layer_laws_are_complete(norm_first):
    """Before: a ModelError (torch.fx cannot trace it) and n_known = 0 against 27 / 26 laws.
    Now every law is detected, and the count agrees at three points."""
    X = torch.randn(8, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        laws = checked(layer(norm_first), X)
    assert kinds(laws) == EXPECTED[norm_first]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = fs.laws.count(layer(norm_first), X, loss="mse")
    expected = 27 if norm_first else 26
    assert result.counts == (expected,) * 3 and result.n_known == expected and result.complete, result


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_an_encoder_stack_inside_a_users_model(norm_first):
    """nn.TransformerEncoder of two layers (and a final norm), sequence first, between a
    user's Linear layers: the laws of each layer, found as above, hold in the whole model."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
            one = nn.TransformerEncoderLayer(4, 2, 2, dropout=0.0, norm_first=norm_first)
            self.body = nn.TransformerEncoder(one, 2, norm=nn.LayerNorm(4), enable_nested_tensor=False)

        def forward(self, x):
            return self.head(self.body(self.inp(x).transpose(0, 1)).mean(0))

    laws = checked(Model(), torch.randn(8, 3, 3), "cross_entropy")
    found = kinds(laws)
    for i in (0, 1):
        assert ("attention_qk", f"body.layers.{i}.self_attn", 6) in found
        assert ("rescale", f"body.layers.{i}.linear1|body.layers.{i}.linear2", 2) in found
    assert ("rescale", "body.norm|head", 4) in found


def test_what_the_path_does_not_cover_stays_a_leaf():
    """A mask, a hook on the layer itself: the layer is left to torch.fx as a leaf, and no law
    involves its parameters (a warning says so); a subclass (its forward may differ) is traced
    as written, which torch.fx cannot: a ModelError."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer(False), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.layer(x, src_mask=torch.zeros(3, 3)).mean(1))

    X = torch.randn(8, 3, 4)
    with pytest.warns(UserWarning, match=r"does not look inside layer \(TransformerEncoderLayer\)"):
        laws = checked(Masked(), X, "cross_entropy")
    assert kinds(laws) == [("translation", "head", 5)]
    hooked = nn.Sequential(layer(True), nn.Flatten(), nn.Linear(12, 3))
    hooked[0].register_forward_hook(lambda module, inputs, output: output.tanh())
    with pytest.warns(UserWarning, match=r"0 \(TransformerEncoderLayer\): has a forward hook"):
        laws = checked(hooked, X, "cross_entropy")
    assert kinds(laws) == [("translation", "2", 13)]

    class Mine(nn.TransformerEncoderLayer):
        pass

    with pytest.raises(fs.ModelError, match="torch.fx cannot trace Mine"):
        fs.laws.detect(Mine(4, 2, 2, dropout=0.0, batch_first=True), loss="mse", inputs=X)


def test_a_path_that_is_not_the_forward_is_refused(monkeypatch):
    """The traced path is checked against the module's own output: a path that left out the
    feed-forward block (as a torch whose forward changed would make) is a ModelError."""

    def without_feed_forward(module, src):
        return module.norm1(src + module._sa_block(src, None, None, is_causal=False))

    monkeypatch.setitem(detection.MATH_PATHS, nn.TransformerEncoderLayer, without_feed_forward)
    with pytest.raises(fs.ModelError, match="does not compute what the model does"):
        fs.laws.detect(layer(False), loss="mse", inputs=torch.randn(2, 3, 4))
