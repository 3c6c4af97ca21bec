"""Recover: synthesise images by matching a frozen teacher's BatchNorm statistics."""

from scdd.recover.bn_loss import BNStatLoss, local_batch_stats
from scdd.recover.rounds import RecoverResult, Unit, plan_units, recover_dataset
from scdd.recover.synthesize import SynthesisResult, freeze, prepare_teacher, synthesize

__all__ = [
    "BNStatLoss",
    "RecoverResult",
    "SynthesisResult",
    "Unit",
    "freeze",
    "local_batch_stats",
    "plan_units",
    "prepare_teacher",
    "recover_dataset",
    "synthesize",
]
