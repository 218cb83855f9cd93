"""Exceptions raised by memit_fast. Every one leaves the model's weights as they were."""


class MemitError(Exception):
    """Base class of memit_fast's errors."""


class RequestError(MemitError, ValueError):
    """A request is malformed: prompt template, subject, target, or a conflict between requests."""


class HyperParamsError(MemitError, ValueError):
    """Hyper-parameters that do not fit the model: unknown field, layer out of range, wrong module name."""


class RestoreError(MemitError, ValueError):
    """Original weights that cannot be put back: empty, unknown name, wrong shape, dtype or device."""


class StatsError(MemitError, ValueError):
    """Statistics that cannot be used: NaN/inf, empty, corrupted, or computed for another model."""


class TargetError(MemitError, RuntimeError):
    """The optimisation of a target vector z produced NaN or inf."""


class SolveError(MemitError, RuntimeError):
    """The update solve failed or produced NaN/inf."""


class NotPositiveDefiniteError(SolveError):
    """lambda * C + K K^T is not positive definite (Cholesky failed)."""


class ArtifactError(MemitError, ValueError):
    """A saved edit that cannot be read or applied: missing or corrupted files, another base model."""


class ConfigError(MemitError, ValueError):
    """A run setting that cannot be used: an unknown EditConfig field, a bad value, or a
    MEMIT_FAST_* environment variable that does not parse."""


class DistributedError(MemitError, RuntimeError):
    """A rank of a torch.distributed group failed (every rank raises it), or the ranks disagree."""
