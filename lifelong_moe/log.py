"""The ``lifelong_moe`` logger: what a run tells its user, on the console and in Hydra's job log.

Records print as their bare message, as ``print`` did: INFO and below on stdout, WARNING and
above on stderr. The handlers write to whatever ``sys.stdout``/``sys.stderr`` is at that moment
(pytest's capture, a forked test child's files), and flush every line.

The logger does not propagate: Hydra's console handler on the root logger would print every
line a second time in its own format. Instead :func:`to_job_log` hands each record to the root
logger's file handlers too, so ``outputs/<date>/<time>/<job>.log`` holds what the console showed.

Error lines that end the process (``error: ...``, exit 2) and the second-Ctrl-C line in the
signal handler stay plain ``print``: the first are the CLI's contract, the second must not take
the logging lock from inside a signal handler.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("lifelong_moe")


class ConsoleHandler(logging.StreamHandler):
    """The bare message on ``sys.<stream_name>`` as it is when the record comes."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: ANN201 - whatever file object sys holds
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream: the sys lookup wins
        pass


def _console() -> None:
    out = ConsoleHandler("stdout")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = ConsoleHandler("stderr")
    err.setLevel(logging.WARNING)
    LOGGER.addHandler(out)
    LOGGER.addHandler(err)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def to_job_log() -> None:
    """Also write to the file handlers Hydra gave the root logger for this job (its job log);
    the previous job's (a sweep runs several in one process) are dropped."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, logging.FileHandler)]:
        LOGGER.removeHandler(handler)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            LOGGER.addHandler(handler)


_console()
