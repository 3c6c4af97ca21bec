"""scdd: dataset distillation by BatchNorm-statistic recovery (SRe2L, SC-DD)."""

__version__ = "0.1.0"
