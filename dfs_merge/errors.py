"""Typed errors for a user's mistakes.

Every error a user can cause (a missing model, incompatible sources, a malformed
genome or config) is a `DfsMergeError`. The CLI prints its message as one line and
exits with code 2; anything else is a bug and keeps its traceback.
"""


class DfsMergeError(Exception):
    """A problem with the user's input, explained in one line."""


class SourceError(DfsMergeError):
    """A source model is missing, unreadable or of an unsupported architecture."""


class IncompatibleSources(SourceError):
    """Two sources cannot be stitched: they differ in a field that matters."""


class GenomeError(DfsMergeError):
    """A genome file or a genome is malformed, or decodes to an unusable route."""


class ConfigError(DfsMergeError):
    """A run config is malformed."""


class FitnessError(DfsMergeError):
    """An evaluation task is unknown or its data is malformed."""


class ExportError(DfsMergeError):
    """An export cannot be written or does not verify."""


class TrackingError(DfsMergeError):
    """The run's tracker (`tracking:` wandb, mlflow) cannot start."""


class ReportError(DfsMergeError):
    """A run folder cannot be reported on, or its report cannot be written."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as `Type: message` on one line, at most about `limit` characters: for error messages
    that wrap a library's exception."""
    text = " ".join(str(err).split()) or repr(err)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"
