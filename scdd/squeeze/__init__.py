"""Squeeze: build the teacher whose BatchNorm statistics recovery matches."""

from scdd.squeeze.methods import METHODS, register_method
from scdd.squeeze.supervised import train_supervised

__all__ = ["METHODS", "register_method", "train_supervised"]
