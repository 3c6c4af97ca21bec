"""Recover: synthesise images by matching a frozen teacher's BatchNorm (and convolution) statistics."""

from scdd.recover.bn_loss import BNStatLoss
from scdd.recover.conv_loss import ConvStatLoss
from scdd.recover.objective import RecoverObjective
from scdd.recover.rounds import (
    RecoverResult,
    Unit,
    class_slices,
    collect_result,
    image_format_of,
    merge_shares,
    pending_units,
    plan_units,
    recover_dataset,
    recover_plan,
    run_share,
    shares_of,
)
from scdd.recover.scope import BatchScope, GlobalScope, LocalScope, local_batch_stats
from scdd.recover.synthesize import SynthesisResult, freeze, prepare_teacher, recover_loss, synthesize

__all__ = [
    "BNStatLoss",
    "BatchScope",
    "ConvStatLoss",
    "GlobalScope",
    "LocalScope",
    "RecoverObjective",
    "RecoverResult",
    "SynthesisResult",
    "Unit",
    "class_slices",
    "collect_result",
    "freeze",
    "image_format_of",
    "local_batch_stats",
    "merge_shares",
    "pending_units",
    "plan_units",
    "prepare_teacher",
    "recover_dataset",
    "recover_loss",
    "recover_plan",
    "run_share",
    "shares_of",
    "synthesize",
]
