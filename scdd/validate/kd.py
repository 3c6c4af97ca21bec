"""Knowledge-distillation loss (Hinton et al. arXiv 1503.02531)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            t_squared: bool = True) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, batch mean. (N, K), (N, K) -> (). `t_squared` false: the KL
    alone (the SRe2L / SC-DD scripts)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2 if t_squared else kl
