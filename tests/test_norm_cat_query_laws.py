"""Laws the count showed detection missing, now built: the shifts and scales a GroupNorm undoes
(per group), rescale through torch.cat, the query bias under a softmax over the queries (dim
−2). Each is checked against the gradient flowsim integrates (float64, random θ) and the count
of every law agrees with the detected ones at three points."""

import math
import warnings

import pytest
import torch
from torch import nn

import flowsim as fs
from flowsim.laws import Term

from conftest import checked_laws


def kinds(laws):
    return [(law.kind, law.site, law.size) for law in laws]


def checked(model, X, loss="cross_entropy"):
    return checked_laws(model, X, loss)


def complete(model, X, loss="cross_entropy"):
    """The count at three points: each equal to the rank of the detected laws."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = fs.laws.count(model, X, loss=loss)
    assert result.complete and len(set(result.counts)) == 1 and result.n_laws == result.n_known, result
    return result


# ------------------------------------------------------------------------ GroupNorm
class ConvGroupNorm(nn.Module):
    """conv → GroupNorm(2 groups of 2 channels) → ReLU → conv → mean → Linear."""

    def __init__(self, affine):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.gn = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4, eps=0.0, affine=affine)
        self.c2, self.fc = nn.Conv2d(4, 2, 3, padding=1), nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.gn(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_group_norm_undoes_a_shift_and_a_scale_per_group(affine):
    """GroupNorm subtracts the mean of each example's group (channels × positions) and divides
    by its spread: a bias shift constant over a group is ignored (the sum of c1's bias over each
    group is conserved) and so is a positive scale of the group (|W_g|² + |b_g|² per group,
    exact at eps = 0); an affine GroupNorm is a source like a BatchNorm (gn|c2 rescale).
    Before: 5 of 9 (13) laws detected."""
    X = torch.randn(8, 1, 4, 4)
    laws = checked(ConvGroupNorm(affine), X)
    expected = [("scale", "c1", 2), ("translation", "c1", 2), ("rescale", "c2|fc", 2), ("translation", "fc", 3)]
    if affine:
        expected.insert(2, ("rescale", "gn|c2", 4))
    assert kinds(laws) == expected
    shift = laws[1]
    assert shift.groups == ((Term("c1.bias", "sum", units=2),),) and shift.components == ("bias group 0", "bias group 1")
    assert laws[0].groups == ((Term("c1.weight", "sq", units=2), Term("c1.bias", "sq", units=2)),) and laws[0].exact
    assert complete(ConvGroupNorm(affine), X).n_laws == (13 if affine else 9)


def test_group_norm_after_a_linear_keeps_each_groups_column_sums():
    """Linear(4→8) → GroupNorm(2 groups of 4): a column of the weight shifted by one number per
    group shifts each example's group by a constant: Σ_{j∈g} W[j, k] for each group g and
    column k is conserved (8 components), and each group's bias sum. (Groups of 3 normalise
    onto a circle, and a GroupNorm without a bias leaves the count no bias to mix its ReLU
    units by: its points disagree there.)"""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.gn, self.b = nn.Linear(4, 8), nn.GroupNorm(2, 8, eps=0.0), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.gn(self.a(x))))

    X = torch.randn(8, 4)
    laws = checked(Model(), X)
    expected = [("scale", "a", 2), ("translation", "a", 2), ("translation", "a", 8), ("rescale", "gn|b", 8), ("translation", "b", 9)]
    assert kinds(laws) == expected
    columns = laws[2]
    assert [t.part for (t,) in columns.groups] == [(0, 0, 4), (0, 4, 8)] and columns.components[4] == "group 1 col 0"
    assert complete(Model(), X).n_laws == 29


# ------------------------------------------------------------------------ torch.cat
class Concatenated(nn.Module):
    """out(cat([relu(a(x)), relu(b(x))])): each branch's units rescaled against their own
    columns of out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


class ConcatenatedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.c, self.fc = nn.Conv2d(4, 2, 3), nn.Linear(2, 3)

    def forward(self, x):
        h = torch.cat((torch.relu(self.a(x)), torch.relu(self.b(x))), 1)
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def test_rescale_through_a_concatenation():
    """The rescale law a|out reads out's columns 0–2 and b|out its columns 3–4 (a `part` of the
    weight); on channels, a|c and b|c the input channels of c. Before: none across the cat."""
    laws = checked(Concatenated(), torch.randn(8, 4))
    assert kinds(laws) == [("rescale", "a|out", 3), ("rescale", "b|out", 2), ("translation", "out", 6)]
    assert laws[1].groups[0][-1] == Term("out.weight", "sq", axis=1, units=2, sign=-1, stride=1, part=(1, 3, 5))
    assert complete(Concatenated(), torch.randn(8, 4)).n_laws == 11
    X = torch.randn(8, 1, 5, 5)
    laws = checked(ConcatenatedChannels(), X)
    assert kinds(laws) == [("rescale", "a|c", 2), ("rescale", "b|c", 2), ("rescale", "c|fc", 2), ("translation", "fc", 3)]
    assert complete(ConcatenatedChannels(), X).n_laws == 9


def test_a_concatenation_that_a_norm_or_an_add_reads_makes_no_law_through_it():
    """The other tensor's entries are not scaled: a LayerNorm over the concatenation, or an
    add, would mix them with the scaled units, so the walk stops there (no a|… law); the law
    of a tensor concatenated with a function of itself reads both slots."""

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.ln, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.LayerNorm(6, eps=0.0), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.cat([torch.relu(self.a(x)), self.b(x)], -1)
            return self.out(self.ln(h) + h)

    laws = checked(Normed(), torch.randn(8, 4))
    assert not any(law.site.startswith(("a|", "b|")) or law.kind == "scale" for law in laws)

    class Itself(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.out = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.out(torch.cat([h, torch.relu(h)], -1))

    laws = checked(Itself(), torch.randn(8, 4))
    assert kinds(laws) == [("rescale", "a|out", 3), ("translation", "out", 7)]
    assert complete(Itself(), torch.randn(8, 4)).n_laws == 10


# ------------------------------------------------------------------------ attention biases
class Scores(nn.Module):
    """o(softmax(q kᵀ / 2 [masked], dim) v), biases everywhere."""

    def __init__(self, dim=-1, fill=None):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
        self.dim, self.fill = dim, fill

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / 2
        if self.fill is not None:
            scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), self.fill)
        return self.o(scores.softmax(dim=self.dim) @ self.v(x))


@pytest.mark.parametrize("dim", [-1, -2, 1], ids=["over-keys", "over-queries", "over-queries-positive-dim"])
def test_the_bias_a_softmax_ignores(dim):
    """q_i·k_j = … + b_q·k_j + q_i·b_k: a softmax over the keys ignores b_k (constant over j),
    one over the queries ignores b_q (constant over i): that bias is conserved entry by entry.
    Before: the query bias was not detected (count 24, 20 known)."""
    X = torch.randn(8, 3, 4)
    laws = checked(Scores(dim), X, "mse")
    bias = "k" if dim == -1 else "q"
    expected = [("attention_qk", "q|k", 10), ("translation", bias, 4), ("rescale", "v|o", 4), ("attention_vo", "v|o", 10)]
    assert kinds(laws) == expected
    assert laws[1].groups == ((Term(f"{bias}.bias", "sum", units=4),),)
    if dim < 0:  # dim=1 is dim=−2 of these scores: the same model
        assert complete(Scores(dim), X, "mse").n_laws == 24


@pytest.mark.parametrize("fill", [-math.inf, 0.0], ids=["minus-infinity", "zero"])
def test_a_mask_filled_with_a_finite_number_breaks_the_key_bias_law(fill):
    """masked_fill(mask, −∞) keeps the masked scores at weight 0 whatever the shift: the key
    bias law holds. Filled with 0.0 they stay at 0 while the others shift: the law was
    returned before and was false (relative inner product 0.004–0.06 with the gradient)."""
    laws = checked(Scores(-1, fill), torch.randn(8, 3, 4), "mse")
    assert (("translation", "k", 4) in kinds(laws)) is (fill == -math.inf)
