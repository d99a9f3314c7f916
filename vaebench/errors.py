"""User-facing errors.

Anything the user can fix (an unknown name, an out-of-range number, a missing or corrupt file,
NaNs in data) raises a subclass of :class:`VaebenchError`. The command line prints its message on
one line of stderr and exits with status 2; library callers can catch it.
"""


class VaebenchError(Exception):
    """Base class of every error caused by user input; its message is one self-contained line."""


class ConfigError(VaebenchError, ValueError):
    """An option has an unknown name or an out-of-range value."""


class DataError(VaebenchError):
    """A data set is missing, corrupt, or incompatible with the chosen likelihood."""


class RunDirError(VaebenchError):
    """A run directory is missing, incomplete, corrupt, or would be overwritten."""


class TrainingDivergedError(VaebenchError):
    """The training objective became non-finite."""
