"""Approximate activations: an exact forward pass, low-bit copies of activations for backward.

Chakrabarti & Moseley, "Backprop with Approximate Activations for Memory-efficient Network Training"
(NeurIPS 2019), and its generic successors ActNN (Chen et al., ICML 2021) and GACT (Liu et al., ICML
2022). Modes (``gradkit train --activations MODE``):

* ``blpa8`` / ``blpa4``: the paper's BatchNorm -> ReLU -> Conv unit in our ResNets keeps only the
  quantised normalised value, on a grid aligned with the ReLU threshold (:mod:`._blpa`); the other
  saved tensors take the generic path at the same width.
* ``int8`` / ``int4`` / ``int2``: every saved activation of any model as per-group codes
  (:mod:`._hooks`, :mod:`._quant`); int2 keeps attention's inputs and outputs at 8 bits
  (``attention_bits``, :mod:`._rules`).
* ``naive8``: the paper's baseline, activations quantised in the forward pass as well.

In every mode the loss's saved tensors stay exact, inside the model's forward too (:mod:`._rules`).
Whether a mode's gradients stay right once the model is trained: :func:`check_gradients` with
``weights=`` or ``steps=``, and :func:`track_gradients` over a training run.

Example:
    >>> act = gradkit.compress.Activations(model, "int4")
    >>> with act:
    ...     loss = F.cross_entropy(model(x), y)
    >>> loss.backward()
"""

from gradkit.compress._blpa import apply_blpa, bn_relu_conv, remove_blpa
from gradkit.compress._check import (
    GradientCheck,
    LayerGradient,
    check_gradients,
    load_weights,
    pretrain,
    track_gradients,
)
from gradkit.compress._hooks import ActivationCompressor, SavedRecord
from gradkit.compress._measure import ActivationMemory, measure_activations
from gradkit.compress._modes import (
    ATTENTION_BITS,
    MODES,
    Activations,
    ModeSpec,
    parse_attention_bits,
    parse_mode,
)
from gradkit.compress._native import MAX_GROUP as MAX_GROUP_SIZE
from gradkit.compress._quant import Packed, pack, pack_reference, unpack, unpack_reference

__all__ = [
    "ATTENTION_BITS",
    "MAX_GROUP_SIZE",
    "MODES",
    "ActivationCompressor",
    "ActivationMemory",
    "Activations",
    "GradientCheck",
    "LayerGradient",
    "ModeSpec",
    "Packed",
    "SavedRecord",
    "apply_blpa",
    "bn_relu_conv",
    "check_gradients",
    "load_weights",
    "measure_activations",
    "pack",
    "pack_reference",
    "parse_attention_bits",
    "pretrain",
    "parse_mode",
    "remove_blpa",
    "track_gradients",
    "unpack",
    "unpack_reference",
]
