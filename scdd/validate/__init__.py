"""Validate: train a student on distilled images (and on a random real subset), test on real data."""

from scdd.validate import ranking
from scdd.validate.baseline import random_real_subset
from scdd.validate.kd import kd_loss
from scdd.validate.mix import mix_batch
from scdd.validate.protocol import Protocol, resolve_protocol
from scdd.validate.train import train_student

__all__ = ["Protocol", "kd_loss", "mix_batch", "random_real_subset", "ranking", "resolve_protocol", "train_student"]
