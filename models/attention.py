"""Attention: one multi-head attention layer, a transformer block and a small transformer.

Inputs are sequences of token vectors, (batch, length, features) — one-hot tokens for
``flowsim.data.sequences``. The attention is written out with matmul and softmax (not
``nn.MultiheadAttention``), so torch.fx sees every op and ``flowsim.laws.detect`` finds its
query–key and value–output laws per head from the graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import MAX_DEPTH, flag, number, one_of, refusal
from .mlp import activation_layer

NORMS = ("pre", "post", "none")


class Attention(nn.Module):
    """softmax(q kᵀ / √d_h [+ causal mask]) v per head, then the output map.

    ``q``, ``k``, ``v``: Linear(d_model → heads·head_dim); ``o``: Linear(heads·head_dim →
    d_model). Head h uses rows h·d_h … (h+1)·d_h − 1 of q, k and v and the same columns of o.
    """

    def __init__(self, d_model: int, heads: int = 2, head_dim: int | None = None, bias: bool = False, causal: bool = False) -> None:
        super().__init__()
        d_model = number("d_model", d_model, integer=True, minimum=1)
        heads = number("heads", heads, integer=True, minimum=1)
        if head_dim is None:
            if d_model % heads:
                raise refusal("heads", heads, f"a divisor of d_model={d_model}, or give head_dim")
            head_dim = d_model // heads
        head_dim = number("head_dim", head_dim, integer=True, minimum=1)
        flag("causal", causal)
        self.heads, self.head_dim, self.causal = heads, head_dim, causal
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(d_model, inner, bias=bias) for _ in range(3))
        self.o = nn.Linear(inner, d_model, bias=bias)

    def split(self, x: Tensor) -> Tensor:
        """(B, T, heads·head_dim) → (B, heads, T, head_dim)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class Block(nn.Module):
    """A transformer block: attention and a two-layer MLP, each added to the residual stream.

    ``norm="pre"``: x + attn(ln1(x)), then + fc2(act(fc1(ln2(x)))). ``"post"``: ln1(x + attn(x)),
    then ln2(x + fc2(act(fc1(x)))). ``"none"``: no LayerNorm.
    """

    def __init__(
        self,
        d_model: int,
        heads: int = 2,
        head_dim: int | None = None,
        hidden: int = 32,
        norm: str = "pre",
        activation: str = "relu",
        bias: bool = True,
        causal: bool = False,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        one_of("norm", norm, NORMS)
        hidden = number("hidden", hidden, integer=True, minimum=1)
        ln_eps = number("ln_eps", ln_eps, minimum=0.0)
        self.norm = norm
        self.ln1 = nn.LayerNorm(d_model, eps=ln_eps) if norm != "none" else nn.Identity()
        self.attn = Attention(d_model, heads, head_dim, bias=bias, causal=causal)
        self.ln2 = nn.LayerNorm(d_model, eps=ln_eps) if norm != "none" else nn.Identity()
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.act = activation_layer(activation)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm == "post":
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.fc2(self.act(self.fc1(x))))
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Token vectors → ``embed`` (no bias) + learned positions → blocks → [final LayerNorm for
    pre-norm blocks] → mean over the sequence → ``head``: class logits."""

    def __init__(self, vocab: int, length: int, width: int, blocks: list[Block], num_classes: int, final_norm: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(vocab, width, bias=False)
        self.pos = nn.Parameter(torch.randn(length, width) / math.sqrt(width))
        self.blocks = nn.Sequential(*blocks)
        self.norm = final_norm
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(1))


def layer(d_model: int = 8, heads: int = 2, head_dim: int | None = None, bias: bool = False, causal: bool = False) -> Attention:
    """One attention layer, (B, T, d_model) → (B, T, d_model): laws attention_qk and
    attention_vo per head (d_h(d_h+1)/2 components each) and the v|o rescale law."""
    return Attention(d_model, heads, head_dim, bias=bias, causal=causal)


def block(
    d_model: int = 8,
    heads: int = 2,
    head_dim: int | None = None,
    hidden: int = 16,
    norm: str = "pre",
    activation: str = "relu",
    bias: bool = True,
    causal: bool = False,
    ln_eps: float = 1e-5,
) -> Block:
    """One transformer block, (B, T, d_model) → (B, T, d_model) (see ``Block``)."""
    return Block(d_model, heads, head_dim, hidden, norm, activation, bias, causal, ln_eps)


def transformer(
    vocab: int = 8,
    length: int = 8,
    width: int = 16,
    heads: int = 2,
    head_dim: int | None = None,
    hidden: int = 32,
    depth: int = 1,
    num_classes: int = 8,
    norm: str = "pre",
    activation: str = "relu",
    bias: bool = True,
    causal: bool = False,
    ln_eps: float = 1e-5,
) -> Transformer:
    """A classifier of token sequences: `depth` blocks of `width` (see ``Transformer``).

    Layer names: ``embed``, ``pos``, ``blocks.{i}.{ln1,attn.{q,k,v,o},ln2,fc1,fc2}``, ``norm``,
    ``head``. `vocab` and `length` are read off the data (X of shape (N, length, vocab)).
    """
    depth = number("depth", depth, integer=True, minimum=1, maximum=MAX_DEPTH)
    width = number("width", width, integer=True, minimum=1)
    vocab = number("vocab", vocab, integer=True, minimum=1)
    length = number("length", length, integer=True, minimum=1)
    num_classes = number("num_classes", num_classes, integer=True, minimum=1)
    blocks = [Block(width, heads, head_dim, hidden, norm, activation, bias, causal, ln_eps) for _ in range(depth)]
    final = nn.LayerNorm(width, eps=ln_eps) if norm == "pre" else nn.Identity()
    return Transformer(vocab, length, width, blocks, num_classes, final)


__all__ = ["Attention", "Block", "Transformer", "layer", "block", "transformer"]
