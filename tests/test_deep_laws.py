"""Detection on deep models: the graph walks use explicit stacks, not recursion, so a residual
stream through hundreds of blocks (a path of thousands of graph nodes) is walked whatever
Python's recursion limit (it raised RecursionError at 128 ResNet blocks before)."""

import sys
import time

import torch
from torch import nn

import flowsim as fs


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Deep(nn.Module):
    """Linear(3→2), `depth` residual blocks on a stream of width 2, ReLU, Linear(2→3)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks, self.out = nn.Linear(3, 2), nn.Sequential(*(Block() for _ in range(depth))), nn.Linear(2, 3)

    def forward(self, x):
        return self.out(torch.relu(self.blocks(self.inp(x))))


def frames() -> int:
    """The depth of the Python stack here."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_two_hundred_residual_blocks_under_a_low_recursion_limit():
    """200 blocks, detected with 150 frames to spare above the test's own (the walk along the
    stream needed 3–4 frames per block before): the stream's rescale law has all 201 writers
    and 201 readers, each block its own rescale law, and the head its translation law."""
    model = Deep(200)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames() + 150)
    try:
        start = time.perf_counter()
        laws = fs.laws.detect(model, inputs=torch.randn(2, 3))
        seconds = time.perf_counter() - start
    finally:
        sys.setrecursionlimit(limit)
    stream = next(law for law in laws if "+" in law.site)
    writers, readers = stream.site.split("|", 1)
    assert stream.kind == "rescale" and stream.size == 2
    assert writers.split("+") == ["inp"] + [f"blocks.{i}.fc2" for i in range(200)]
    assert readers.split("|") == [f"blocks.{i}.fc1" for i in range(200)] + ["out"]
    assert sum(law.kind == "rescale" and law.site == f"blocks.{i}.fc1|blocks.{i}.fc2" for i in range(200) for law in laws) == 200
    assert ("translation", "out", 3) in [(law.kind, law.site, law.size) for law in laws]
    # both walks are quadratic in the depth (each writer's walk goes down the whole stream): seconds, not minutes
    assert seconds < 60, seconds
