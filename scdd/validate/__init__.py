"""Validate: train a student on distilled images and test it on real data."""

from scdd.validate.kd import kd_loss, train_student_kd

__all__ = ["kd_loss", "train_student_kd"]
