"""The job spec, the report and the API models (pydantic only: the leaf layer, imports nothing of ours)."""

from api_schema.names import DATASETS, METHODS, MODELS, SSL_METHODS
from api_schema.service import (
    ACTIVE_STATES,
    FINAL_STATES,
    JOB_STATES,
    ArtifactList,
    ArtifactOut,
    ErrorOut,
    JobList,
    JobOut,
    JobState,
)
from api_schema.report import JobSummary, Report, ValidateReport
from api_schema.spec import (
    AugmentSpec,
    DatasetSpec,
    JobSpec,
    OutputSpec,
    ProbeSpec,
    RecoverSpec,
    ResourcesSpec,
    SSLSpec,
    TeacherSpec,
    ValidateSpec,
)

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "JOB_STATES",
    "ArtifactList",
    "ArtifactOut",
    "ErrorOut",
    "JobList",
    "JobOut",
    "JobState",
    "JobSummary",
    "Report",
    "ValidateReport",
    "DATASETS",
    "METHODS",
    "MODELS",
    "SSL_METHODS",
    "AugmentSpec",
    "DatasetSpec",
    "JobSpec",
    "OutputSpec",
    "ProbeSpec",
    "RecoverSpec",
    "ResourcesSpec",
    "SSLSpec",
    "TeacherSpec",
    "ValidateSpec",
]
