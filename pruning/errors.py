"""Errors a user can act on. The CLI prints their message as one line; the worker stores it on the job."""


class EvosparseError(Exception):
    """Base class: the message alone must tell the user what to change."""


class ModelLoadError(EvosparseError):
    """The model could not be found, downloaded or parsed."""


class DataSourceError(EvosparseError):
    """A calibration/evaluation source could not be read or holds too little text."""


class PruningConfigError(EvosparseError):
    """A sparsity, pattern or allocation that cannot be applied to this model."""


class CancelledError(EvosparseError):
    """The job was cancelled by its owner; raised between generations/blocks."""
