"""``gpt``: a small decoder-only transformer language model (GPT-2 layout, after nanoGPT).

Token ids ``(N, T)`` int64 -> next-token logits ``(N, T, vocab)``, as the ``text`` dataset serves them
(``num_classes`` is the vocabulary). Blocks, for :func:`gradkit.stages.split`:

* ``embed``: token embedding + learned position embedding;
* ``block1`` .. ``blockN``: pre-norm residual blocks, ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``,
  causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)`` and a GELU MLP
  of width ``4 * width``;
* ``head``: final LayerNorm and the output projection.

The output projection's weight is **tied** to the token embedding (Press & Wolf, 2017): the very same
``nn.Parameter`` object is ``embed.token.weight`` and ``head.proj.weight``, so the first and the last
block share it and, split into stages, the first and the last stage hold it. Its gradient is the sum of
both uses; pipelined methods update it once per step with that sum and one optimizer state
(:mod:`gradkit.pipeline.shared`), and nothing is special-cased here.

Reference: Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from gradkit.errors import ConfigError
from gradkit.models._registry import MODELS

__all__ = ["GPTEmbedding", "GPTBlock", "GPTHead", "CausalSelfAttention", "gpt"]


class GPTEmbedding(nn.Module):
    """Token plus learned position embedding: ids ``(N, T)`` -> ``(N, T, width)``."""

    def __init__(self, vocab_size: int, width: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.context}")
        # Positions (N, T) rather than (T,): the position embedding's output then has a batch dimension
        # like every other layer's, which per-sample noise (ulr) needs.
        positions = torch.arange(t, device=ids.device).expand(ids.shape[0], t)
        return self.token(ids.long()) + self.position(positions)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (N, T, C) -> (N, heads, T, C / heads)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class GPTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), proj=nn.Linear(4 * width, width)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits (weight tied to the token embedding)."""

    def __init__(self, width: int, embedding: nn.Embedding) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embedding.num_embeddings, bias=False)
        self.proj.weight = embedding.weight  # the tie: one Parameter object, two uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))


@MODELS.register("gpt", help="decoder-only transformer language model, tied embedding (needs --data text)")
def gpt(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    layers: int = 4,
    width: int = 128,
    heads: int = 4,
    context: int | None = None,
) -> nn.Sequential:
    """A GPT of ``layers`` blocks of ``width`` channels and ``heads`` attention heads.

    Args:
        input_shape: ``(T,)``, the sequence length of the data.
        num_classes: the vocabulary size (the ``text`` dataset's ``num_classes``).
        layers: transformer blocks.
        width: embedding width (a multiple of ``heads``).
        heads: attention heads per block.
        context: longest sequence the position embedding covers (default: ``T``).

    Returns:
        ``nn.Sequential(embed, block1, ..., blockN, head)``, ids ``(N, T)`` -> logits ``(N, T, V)``;
        ``head.proj.weight is embed.token.weight`` (tied).

    Example:
        >>> model = gpt((32,), 65, layers=2, width=32, heads=2)
        >>> model(torch.zeros(4, 32, dtype=torch.long)).shape
        torch.Size([4, 32, 65])
    """
    if len(input_shape) != 1:
        raise ConfigError(f"model 'gpt' reads token ids (N, T); got examples of shape {tuple(input_shape)}: "
                          "use --data text")
    seq_len = input_shape[0]
    context = seq_len if context is None else context
    for name, value in (("layers", layers), ("width", width), ("heads", heads), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"gpt option {name} must be a positive integer, got {value!r}")
    if width % heads:
        raise ConfigError(f"gpt width {width} must be a multiple of heads {heads}")
    if context < seq_len:
        raise ConfigError(f"gpt context {context} is shorter than the data's sequences of {seq_len} tokens")
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    embed = GPTEmbedding(num_classes, width, context)
    blocks["embed"] = embed
    for i in range(layers):
        blocks[f"block{i + 1}"] = GPTBlock(width, heads)
    blocks["head"] = GPTHead(width, embed.token)
    model = nn.Sequential(blocks)
    _init_weights(model, layers)
    return model


def _init_weights(model: nn.Module, layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(".proj") and "head" not in name else 0.02
            if not name.startswith("head"):  # the head's weight is the embedding's
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
