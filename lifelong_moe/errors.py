"""User-facing errors: one clear line, raised before any training starts."""


class ConfigError(ValueError):
    """A bad value from the user: the message names the value and what was expected.

    The CLI prints it as a single line and exits with status 2; it never becomes a traceback.
    """
