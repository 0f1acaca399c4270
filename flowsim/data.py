"""Data sets that need no download: sklearn's digits, synthetic teacher-student tasks and
seeded token sequences for attention.

Every function returns ``(X, y)``: X a float tensor (default dtype) with the examples on its
first axis, y integer labels (classification) or float targets (regression). A config names
them as ``[data] name = "<function>"``; the other keys are the function's arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import DataError, bad_value, check_number, check_seed


def digits(n_train: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """sklearn's 1,797 handwritten digits as (N, 1, 8, 8) images and labels 0–9.

    Pixels are standardised over the whole set, x ← (x − mean) / std, so inputs are O(1).
    `n_train` keeps a seeded random subset of that many examples (all by default).
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    X = torch.as_tensor(images, dtype=torch.float64)
    X = ((X - X.mean()) / X.std()).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(labels, dtype=torch.long)
    if n_train is not None:
        n_train = check_number("data.n_train", n_train, integer=True, minimum=1, maximum=len(y), cls=DataError)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(check_seed("data.seed", seed, DataError)))[:n_train]
        X, y = X[keep], y[keep]
    return X.to(torch.get_default_dtype()), y


def teacher_student(
    n: int = 256,
    in_features: int = 16,
    hidden: int = 32,
    out_features: int = 1,
    task: str = "regression",
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a random one-hidden-layer ReLU teacher.

    x ~ N(0, I), teacher f(x) = W2 relu(W1 x / √d) / √h. ``task="regression"``: y = f(x) + noise·ε,
    shape (n, out_features). ``task="classification"``: y = argmax f(x) over `out_features`
    classes (at least 2).
    """
    n = check_number("data.n", n, integer=True, minimum=1, cls=DataError)
    in_features = check_number("data.in_features", in_features, integer=True, minimum=1, cls=DataError)
    hidden = check_number("data.hidden", hidden, integer=True, minimum=1, cls=DataError)
    out_features = check_number("data.out_features", out_features, integer=True, minimum=1, cls=DataError)
    noise = check_number("data.noise", noise, minimum=0.0, cls=DataError)
    if task not in ("regression", "classification"):
        raise bad_value("data.task", task, '"regression" or "classification"', DataError)
    if task == "classification" and out_features < 2:
        raise bad_value("data.out_features", out_features, "at least 2 classes for classification", DataError)
    generator = torch.Generator().manual_seed(check_seed("data.seed", seed, DataError))
    X = torch.randn(n, in_features, generator=generator, dtype=torch.float64)
    teacher = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)).double()
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64))
            layer.bias.zero_()
        teacher[0].weight /= in_features**0.5
        teacher[2].weight /= hidden**0.5
        f = teacher(X)
    if task == "classification":
        y = f.argmax(dim=1)
    else:
        y = (f + noise * torch.randn(f.shape, generator=generator, dtype=torch.float64)).to(torch.get_default_dtype())
    return X.to(torch.get_default_dtype()), y


def sequences(n: int = 256, length: int = 8, vocab: int = 8, task: str = "classification", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded random token sequences, one-hot encoded: X of shape (n, length, vocab).

    ``task="classification"``: y is the most frequent token of the sequence (ties go to the
    smallest), one of `vocab` classes — attention that averages over the sequence can read it.
    ``task="regression"``: y[t] = (1/(t+1)) Σ_{s≤t} x[s], the running average of the one-hot
    tokens, shape (n, length, vocab) — exactly what uniform causal attention computes.
    """
    n = check_number("data.n", n, integer=True, minimum=1, cls=DataError)
    length = check_number("data.length", length, integer=True, minimum=1, cls=DataError)
    vocab = check_number("data.vocab", vocab, integer=True, minimum=2, cls=DataError)
    if task not in ("classification", "regression"):
        raise bad_value("data.task", task, '"classification" or "regression"', DataError)
    generator = torch.Generator().manual_seed(check_seed("data.seed", seed, DataError))
    tokens = torch.randint(vocab, (n, length), generator=generator)
    X = nn.functional.one_hot(tokens, vocab).to(torch.get_default_dtype())
    if task == "classification":
        return X, X.sum(1).argmax(1)
    return X, X.cumsum(1) / torch.arange(1, length + 1, dtype=X.dtype)[:, None]


NAMES = ("digits", "teacher_student", "sequences")
