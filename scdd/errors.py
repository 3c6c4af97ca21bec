"""Errors a user can cause. Each message names the thing at fault and how to fix it.

The CLI prints them without a traceback; a job on the service fails with the message (and the stage).
"""


class ScddError(Exception):
    """Base class of user-facing errors."""


class DataError(ScddError):
    """A dataset path, file or layout is wrong."""


class CorruptImageError(DataError):
    """An image file cannot be decoded."""


class UnknownNameError(ScddError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointError(ScddError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class SpecError(ScddError):
    """A job spec or config file is invalid."""


class OutputConflictError(ScddError):
    """The output location holds a different run."""


class ResourceError(ScddError):
    """The cluster cannot provide what the job asks for (workers, CPUs, GPUs)."""


class WorkerFailedError(ScddError):
    """A distributed step kept failing after its retries."""


class JobCancelled(Exception):
    """The job was cancelled on request (not an error: the run ends with status `cancelled`)."""
