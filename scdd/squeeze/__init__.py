"""Squeeze: build the teacher whose BatchNorm statistics recovery matches."""

from scdd.squeeze.methods import METHODS, SqueezeResult, register_method
from scdd.squeeze.probe import extract_features, train_probe
from scdd.squeeze.summary import bn_variance_summary
from scdd.squeeze.supervised import train_supervised
from scdd.squeeze.teachers import Teacher, TeacherCache, load_stored_teacher, recovery_teacher, relabel_teacher

__all__ = [
    "METHODS",
    "SqueezeResult",
    "Teacher",
    "TeacherCache",
    "bn_variance_summary",
    "extract_features",
    "load_stored_teacher",
    "recovery_teacher",
    "register_method",
    "relabel_teacher",
    "train_probe",
    "train_supervised",
]
