"""A tiny character-level language model written outside gradkit, for ``--model tiny_lm:build``.

What gradkit needs from it (README, "Your own model"): a factory ``build(input_shape, num_classes,
**options)`` returning an ``nn.Sequential`` whose children are the blocks split between stages. Token
ids ``(N, T)`` go in, next-token logits ``(N, T, vocab)`` come out, and gradkit's default loss is the
per-token cross-entropy of such outputs (the sequence loss). The output head's weight *is* the input
embedding's (a tied weight): one ``nn.Parameter`` used by the first and the last block.

    PYTHONPATH=examples gradkit train --model tiny_lm:build --data text --data-option path=README.md ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embed(nn.Module):
    def __init__(self, vocab: int, width: int, length: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        nn.init.normal_(self.token.weight, std=0.02)  # it is also the output head: keep the first logits small
        self.position = nn.Parameter(torch.zeros(length, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token(ids) + self.position[: ids.shape[1]]


class Block(nn.Module):
    """Pre-norm causal self-attention, then a GELU MLP, each added to its input."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.norm1(x)).split(c, 2))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embedding.embedding_dim)
        self.weight = embedding.weight  # tied: the very same Parameter as the input embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.weight)


def build(input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, layers: int = 2,
          heads: int = 4) -> nn.Sequential:
    """``embed, block x layers, head``; ``num_classes`` is the vocabulary, ``input_shape`` ``(T,)``."""
    embed = Embed(num_classes, width, input_shape[0])
    return nn.Sequential(embed, *(Block(width, heads) for _ in range(layers)), Head(embed.token))
