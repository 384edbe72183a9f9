"""User-facing errors: one clear line each, never a traceback.

``ConfigError`` is raised before any training starts; ``NonFiniteLossError`` during training.
The CLI is the only place that turns them into a printed line and an exit status.
"""


class ConfigError(ValueError):
    """A bad value from the user: the message names the value and what was expected.

    The CLI prints it as a single line and exits with status 2; it never becomes a traceback.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf: the run stops and is marked FAILED (exit status 1)."""
