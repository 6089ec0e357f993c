"""The errors a command ends on, each with its exit status (cli.main): the bottom of the package,
so every layer raises them without importing the one above."""


class ConfigError(ValueError):
    """Invalid input: the CLI prints it on one line and exits with status 2."""


class DataError(ConfigError):
    """A data problem the user can fix (missing, corrupted or mismatched files); status 2."""


class CheckpointError(ConfigError):
    """A checkpoint that is corrupted, truncated or carries code; never loaded; status 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run is FAILED, its last good checkpoint stays; exit status 1."""


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer: at a command's first request (nothing done yet), or
    past tracking_outage_limit during a training, which stops where it is, its run RUNNING (nothing
    can reach the server to mark it), resumable from its last uploaded checkpoint by the same
    command; exit status 75 (EX_TEMPFAIL)."""
