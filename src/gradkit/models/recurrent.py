"""``rnn``, ``gru``, ``lstm``: text classifiers (token embedding -> recurrent layer -> Linear).

The recurrent layer is written out step by step so that the likelihood-ratio method (Jiang et al.,
ICLR 2024) can put noise at every time step and sum the per-step estimates over time. Noise goes on
the pre-activations of the cell's two affine maps (input-to-hidden and hidden-to-hidden; for RNN and
LSTM their sum), so every path from a weight to the loss passes through noise and each weight's estimate
is the Linear one, ``Σ_t G_tᵀ input_t``. With weight noise (``-o inject=weight``) the layer instead draws
one weight perturbation per copy, used for the whole sequence.

Inputs are token ids stored as float32 of shape ``(N, 1, T)`` (the ``ag-news`` dataset's layout, left-
padded with 0), so the generic batch loader handles them; the embedding rounds them back to ints.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models._layers import positive_ints
from gradkit.models._registry import MODELS

__all__ = ["Recurrent", "TokenEmbedding", "rnn", "gru", "lstm"]

_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` over float-coded token ids ``(N, 1, T)`` -> ``(N, T, dim)``; id 0 is padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(x.shape[0], -1).round().long())


class Recurrent(nn.Module):
    """One recurrent layer (``rnn`` tanh, ``gru`` or ``lstm``), batch-first, returning the last hidden state.

    Parameters follow ``torch.nn.RNN``'s layout (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``,
    gates stacked as torch orders them) and its uniform(±1/√hidden) initialisation.

    Implements :class:`gradkit.likelihood_ratio.StepNoiseLayer`: while ``step_noise`` is set it adds
    ``σ·ε`` to the pre-activations at every step and records the step's inputs.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if kind not in _GATES:
            raise ConfigError(f"unknown recurrent kind {kind!r}; use rnn, gru or lstm")
        self.kind, self.hidden_size = kind, hidden_size
        gates = _GATES[kind] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        bound = 1 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.step_noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None
        self.noise_sigma = 0.0
        self.noise_record_numel = 0
        self._records: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, steps, _ = x.shape
        hid = self.hidden_size
        gates = _GATES[self.kind] * hid
        # What noisy copies record per step: the input, the previous state and one or two noise draws.
        self.noise_record_numel = n * steps * (x.shape[2] + hid + 2 * gates)
        h = x.new_zeros(n, hid)
        c = x.new_zeros(n, hid)
        a_x_all = x @ self.weight_ih.t() + self.bias_ih
        noise = self.step_noise
        for t in range(steps):
            a_x = a_x_all[:, t]
            a_h = h @ self.weight_hh.t() + self.bias_hh
            if noise is not None:
                e_x = noise((n, gates))
                e_h = noise((n, gates)) if self.kind == "gru" else e_x
                self._records.append((x[:, t], h, e_x, e_h))
                a_x = a_x + self.noise_sigma * e_x
                if self.kind == "gru":
                    a_h = a_h + self.noise_sigma * e_h
            if self.kind == "rnn":
                h = torch.tanh(a_x + a_h)
            elif self.kind == "lstm":
                i, f, g, o = (a_x + a_h).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                rx, zx, nx = a_x.chunk(3, dim=1)
                rh, zh, nh = a_h.chunk(3, dim=1)
                r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
                h = (1 - z) * torch.tanh(nx + r * nh) + z * h
        return h

    # -- StepNoiseLayer ----------------------------------------------------------------------------
    def noise_grads(self, coef: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``Σ_t Σ_rows coef·ε_tᵀ input_t`` per weight (the Linear estimator at every step)."""
        out: dict[str, Any] = {name: torch.zeros_like(p) for name, p in self.named_parameters()}
        chi = coef.new_zeros(())
        col = coef.view(-1, 1)
        for x_t, h_prev, e_x, e_h in self._records:
            gx = col * e_x
            gh = col * e_h if e_h is not e_x else gx
            out["weight_ih"] += gx.t() @ x_t
            out["bias_ih"] += gx.sum(0)
            out["weight_hh"] += gh.t() @ h_prev
            out["bias_hh"] += gh.sum(0)
            chi = chi + (col * (e_x**2 - 1)).sum()
            if e_h is not e_x:
                chi = chi + (col * (e_h**2 - 1)).sum()
        return out, chi

    def clear_noise(self) -> None:
        self._records = []
        self.step_noise = None

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden_size={self.hidden_size}"


def _text_model(
    kind: str, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None, embed: int, hidden: int
) -> nn.Sequential:
    if vocab_size is None:
        raise ConfigError(f"model {kind!r} reads token ids: use a text dataset such as --data ag-news")
    (vocab_size, embed, hidden) = positive_ints(kind, "vocab_size/embed/hidden", (vocab_size, embed, hidden))
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["embed"] = TokenEmbedding(vocab_size, embed, padding_idx=0)
    blocks["recurrent"] = Recurrent(kind, embed, hidden)
    blocks["head"] = nn.Sequential(OrderedDict(fc=nn.Linear(hidden, num_classes)))
    return nn.Sequential(blocks)


@MODELS.register("rnn", help="text classifier: embedding -> tanh RNN -> Linear (needs a text dataset)")
def rnn(
    input_shape: tuple[int, ...], num_classes: int, *, vocab_size: int | None = None, embed: int = 64, hidden: int = 128
) -> nn.Sequential:
    """Embedding (``embed``) -> Elman RNN with tanh (``hidden``) -> Linear on the last hidden state."""
    return _text_model("rnn", input_shape, num_classes, vocab_size, embed, hidden)


@MODELS.register("gru", help="text classifier: embedding -> GRU -> Linear (needs a text dataset)")
def gru(
    input_shape: tuple[int, ...], num_classes: int, *, vocab_size: int | None = None, embed: int = 64, hidden: int = 128
) -> nn.Sequential:
    """Embedding (``embed``) -> GRU (``hidden``) -> Linear on the last hidden state."""
    return _text_model("gru", input_shape, num_classes, vocab_size, embed, hidden)


@MODELS.register("lstm", help="text classifier: embedding -> LSTM -> Linear (needs a text dataset)")
def lstm(
    input_shape: tuple[int, ...], num_classes: int, *, vocab_size: int | None = None, embed: int = 64, hidden: int = 128
) -> nn.Sequential:
    """Embedding (``embed``) -> LSTM (``hidden``) -> Linear on the last hidden state."""
    return _text_model("lstm", input_shape, num_classes, vocab_size, embed, hidden)
