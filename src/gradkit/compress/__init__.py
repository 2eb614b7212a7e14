"""Approximate activations: an exact forward pass, low-bit copies of activations for backward.

Chakrabarti & Moseley, "Backprop with Approximate Activations for Memory-efficient Network Training"
(NeurIPS 2019), and its generic successors ActNN (Chen et al., ICML 2021) and GACT (Liu et al., ICML
2022). Modes (``gradkit train --activations MODE``):

* ``blpa8`` / ``blpa4``: the paper's BatchNorm -> ReLU -> Conv unit in our ResNets keeps only the
  quantised normalised value, on a grid aligned with the ReLU threshold (:mod:`._blpa`); the other
  saved tensors take the generic path at the same width.
* ``int8`` / ``int4`` / ``int2``: every saved activation of any model as per-group codes
  (:mod:`._hooks`, :mod:`._quant`).
* ``naive8``: the paper's baseline, activations quantised in the forward pass as well.

Example:
    >>> act = gradkit.compress.Activations(model, "int4")
    >>> with act:
    ...     loss = F.cross_entropy(model(x), y)
    >>> loss.backward()
"""

from gradkit.compress._blpa import apply_blpa, bn_relu_conv, remove_blpa
from gradkit.compress._check import LayerGradient, check_gradients
from gradkit.compress._hooks import ActivationCompressor, SavedRecord
from gradkit.compress._measure import ActivationMemory, LiveTensorPeak, measure_activations
from gradkit.compress._modes import MODES, Activations, ModeSpec, parse_mode
from gradkit.compress._native import MAX_GROUP as MAX_GROUP_SIZE
from gradkit.compress._quant import Packed, pack, pack_reference, unpack, unpack_reference

__all__ = [
    "MAX_GROUP_SIZE",
    "MODES",
    "ActivationCompressor",
    "ActivationMemory",
    "LiveTensorPeak",
    "Activations",
    "LayerGradient",
    "ModeSpec",
    "Packed",
    "SavedRecord",
    "apply_blpa",
    "bn_relu_conv",
    "check_gradients",
    "measure_activations",
    "pack",
    "pack_reference",
    "parse_mode",
    "remove_blpa",
    "unpack",
    "unpack_reference",
]
