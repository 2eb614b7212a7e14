"""Training methods, by name: ``gradkit.methods.build("bp", stages, ...)``."""

from gradkit.methods._base import LossFn, Method
from gradkit.methods._registry import METHODS, build
from gradkit.methods.backprop import Backprop

__all__ = ["METHODS", "Backprop", "LossFn", "Method", "build"]
