"""The job spec and API models (pydantic only: the leaf layer, imports nothing of ours)."""

from api_schema.names import DATASETS, METHODS, MODELS
from api_schema.spec import (
    AugmentSpec,
    DatasetSpec,
    JobSpec,
    OutputSpec,
    RecoverSpec,
    ResourcesSpec,
    TeacherSpec,
    ValidateSpec,
)

__all__ = [
    "DATASETS",
    "METHODS",
    "MODELS",
    "AugmentSpec",
    "DatasetSpec",
    "JobSpec",
    "OutputSpec",
    "RecoverSpec",
    "ResourcesSpec",
    "TeacherSpec",
    "ValidateSpec",
]
