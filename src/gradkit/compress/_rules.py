"""Where the mode's width is not enough: attention (kept at more bits) and the loss (kept exact).

Adaptive schemes give the few sensitive tensors more bits instead of one width for all: ActNN (Chen et
al., ICML 2021) and GACT (Liu et al., ICML 2022) pick per-tensor widths from gradient sensitivity. Two
cases are sensitive enough here to be rules rather than measurements:

* **Attention.** ``scaled_dot_product_attention`` keeps only q, k, v, its output and the row
  log-sum-exp; backward *recomputes* the attention weights ``exp(q k^T / sqrt(d) - lse)`` from the
  stored q and k. With 2-bit q and k that recomputation is wrong by ``exp(error)`` per weight, and the
  error grows as training sharpens attention: a 4-layer, 128-wide GPT at int2 had median per-layer
  gradient cosine 0.997 at initialisation but 0.57 (min -0.54) after 300 steps; with attention at 8 bits
  0.94 (min 0.81). Of that, SDPA's own tensors at 8 bits gave most (0.52 -> 0.90 at another 300-step
  checkpoint), the attention output the rest (0.93); the q/k/v projection's input little (issue 14).
  Tensors saved inside a
  call to ``scaled_dot_product_attention``, ``multi_head_attention_forward`` (``nn.MultiheadAttention``,
  ``nn.Transformer*``) or ``softmax`` (hand-written attention: its weights), and tensors that are views
  or copies of an attention call's output (the output projection's input), count as attention.
* **The loss.** Every gradient starts at the loss: its saved tensors (cross-entropy's log-softmax, a
  regression loss's input) are kept exact wherever it is computed, also inside a model whose forward
  returns the loss. Loss functions are recognised by name (``torch.nn.functional``'s losses,
  ``log_softmax``), so ``F.cross_entropy``, ``nn.CrossEntropyLoss`` and ``x.log_softmax(-1)`` all count.

Calls are seen through a ``TorchFunctionMode`` installed only while a compressing step runs (about 100
Python-level calls per step of the 4-layer GPT; well under 1% of its step time on CPU). In a model
without attention and without a loss inside its forward (ResNets, MLPs), the mode only costs: there it
cost 28% of a ResNet-56 int8 step at batch 2 on CPU, and int8/int4 1.19x/1.28x -> 1.41x/1.44x of exact
at batch 1024 on an H200. So the compressor drops it once every module has run once under it without
such a call (:meth:`ActivationCompressor._rules_settled`): the rules follow what the first steps call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ATTENTION_FUNCTIONS", "LOSS_FUNCTIONS", "VIEW_PATH", "Regions"]

ATTENTION_FUNCTIONS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward", "softmax"})
"""Names of torch functions whose saved tensors are attention's (``F.x``, ``torch.x``, ``Tensor.x``)."""

LOSS_FUNCTIONS = frozenset({
    "cross_entropy", "nll_loss", "log_softmax", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "poisson_nll_loss", "gaussian_nll_loss",
    "soft_margin_loss", "multilabel_soft_margin_loss", "multi_margin_loss", "multilabel_margin_loss",
    "ctc_loss", "cosine_embedding_loss", "margin_ranking_loss", "hinge_embedding_loss",
    "triplet_margin_loss", "triplet_margin_with_distance_loss",
})
"""Names of torch functions whose saved tensors are the loss's (kept exact)."""

# An output's path back to what produced it through views and copies (a head split, a transpose, a
# reshape): the tensor holds the same values, so it is the attention output in another layout.
VIEW_PATH = frozenset({"ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0", "PermuteBackward0",
                       "CloneBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "ToCopyBackward0",
                       "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0", "TBackward0"})

_HOPS = 6


class Regions(TorchFunctionMode):
    """Counts, while a step runs, how many attention and loss calls are in progress.

    ``attention`` and ``loss`` are the counters the compressor reads when a tensor is saved; the output
    of every attention call is remembered (its ``grad_fn``) until :meth:`clear`, so that views and
    copies of it saved later (the output projection's input) count as attention too.
    """

    def __init__(self, inside_model: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.attention = 0
        self.loss = 0
        self.hits = 0
        """Attention or loss calls made inside the model since creation (not reset by :meth:`clear`)."""
        self.active = False
        self._inside_model = inside_model
        self._outputs: dict[int, Any] = {}

    def __enter__(self) -> Regions:
        self.active = True
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        super().__exit__(*exc)

    def clear(self) -> None:
        self.attention = self.loss = 0
        self._outputs.clear()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOSS_FUNCTIONS:
            self.hits += self._inside_model()
            self.loss += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.loss -= 1
        if name in ATTENTION_FUNCTIONS:
            self.hits += self._inside_model()
            self.attention += 1
            try:
                out = func(*args, **kwargs)
            finally:
                self.attention -= 1
            first = out[0] if isinstance(out, tuple) and out else out
            if isinstance(first, torch.Tensor) and first.grad_fn is not None:
                # Held (not just its id) so the id cannot be reused by another node during the step.
                self._outputs[id(first.grad_fn)] = first.grad_fn
            return out
        return func(*args, **kwargs)

    def from_attention(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is an attention call's output, or a view or copy of one."""
        if not self._outputs:
            return False
        fn = t.grad_fn
        for _ in range(_HOPS):
            if fn is None:
                return False
            if id(fn) in self._outputs:
                return True
            if type(fn).__name__ not in VIEW_PATH or not fn.next_functions:
                return False
            fn = fn.next_functions[0][0]
        return False
