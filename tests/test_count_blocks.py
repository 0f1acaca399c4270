"""count_blocks: the laws of a model counted block by block (the submodule theorem)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import flowsim as fs
from flowsim import models
from flowsim.errors import ModelError


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_small_residual_mlp_agrees_with_blocks_by_hand_and_whole_count():
    torch.manual_seed(0)
    model = models.resnet.residual_mlp(in_features=6, out_features=3, depth=2, width=4, hidden=3)
    inputs = torch.randn(8, 6)
    result = fs.laws.count_blocks(model, inputs, "cross_entropy")
    assert [b.name for b in result.blocks] == ["block1", "block2"]  # the residual blocks, by default
    assert result.blocks[1].same_as == "block1"
    # by hand: each block alone, on inputs of its shape (the stream's width), every output direction
    by_hand = fs.laws.count(model.block1, torch.randn(8, 4), "mse")
    for block in result.blocks:
        assert (block.n_params, block.n_laws, block.n_known, block.complete) == (31, by_hand.n_laws, by_hand.n_known, True)
    whole = fs.laws.count(model, inputs, "cross_entropy")
    assert whole.complete
    assert result.complete and result.n_laws == whole.n_laws == 2 * by_hand.n_laws + result.n_stream
    assert result.n_params == whole.n_params and result.n_block_params == 62
    assert any(label.startswith("rescale at inp+block1.fc2+block2.fc2") for label in result.stream_laws)


def test_pre_norm_transformer_block_laws_beyond_its_own_are_stream_laws():
    torch.manual_seed(0)
    model = models.attention.transformer(vocab=4, length=4, width=4, hidden=4, num_classes=4, depth=1)
    inputs = torch.nn.functional.one_hot(torch.randint(0, 4, (8, 4)), 4).float()
    result = fs.laws.count_blocks(model, inputs, "cross_entropy", points=1)
    whole = fs.laws.count(model, inputs, "cross_entropy", points=1)
    assert result.complete and result.n_laws == whole.n_laws
    # the stream is read only through LayerNorms: the block's output biases' sums are laws it lacks alone
    assert "blocks.0" in result.note and any(label == "translation at blocks.0.attn.o" for label in result.stream_laws)


def test_above_the_count_limit_per_block_results_in_bounded_time():
    torch.manual_seed(0)
    model = models.resnet.residual_mlp(in_features=8, out_features=4, depth=6, width=8, hidden=16)
    inputs = torch.randn(8, 8)
    assert sum(p.numel() for p in model.parameters()) > 1000
    start = time.monotonic()
    result = fs.laws.count_blocks(model, inputs, "cross_entropy", points=2)
    assert time.monotonic() - start < 60
    assert len(result.blocks) == 6 and all(b.n_params == 280 and b.n_laws == 16 and b.complete for b in result.blocks)
    assert result.complete and result.n_laws == 6 * 16 + result.n_stream and result.n_stream >= 8 + 3
    # a block above max_params is not counted, and says so
    small = fs.laws.count_blocks(model, inputs, "cross_entropy", max_params=100)
    assert not small.complete and small.n_laws is None
    assert all(b.n_laws is None and b.complete is False and "max_params" in b.note for b in small.blocks)


def test_blocks_by_name_and_bad_names():
    torch.manual_seed(0)
    model = models.resnet.residual_mlp(in_features=6, out_features=3, depth=2, width=4, hidden=3)
    inputs = torch.randn(8, 6)
    result = fs.laws.count_blocks(model, inputs, "cross_entropy", blocks=["block1"], points=1, reuse=False)
    assert [b.name for b in result.blocks] == ["block1"] and result.blocks[0].same_as == ""
    with pytest.raises(ModelError):
        fs.laws.count_blocks(model, inputs, blocks=["nope"])
    with pytest.raises(ModelError):
        fs.laws.count_blocks(model, inputs, blocks=["block1", "block1.fc1"])
