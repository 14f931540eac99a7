"""Errors a user can act on. The CLI prints these as one line and exits non-zero."""

import re

# Line breaks and the other C0 controls (tab aside) a message can quote from input: an
# override `train.lr=x<newline>y`, a dict key, a file name. Shown as escapes.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` on one line, its control characters written as escapes (\\n, \\x00)."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


class FlywheelError(Exception):
    """Base for expected failures: bad input, unreachable services, refused actions.
    Its message is one line whatever input it quotes (`one_line`)."""

    exit_code = 1

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(FlywheelError):
    """A profile or override is invalid. The message names the file and the field."""

    exit_code = 2


class DataError(FlywheelError):
    """Input data is unusable (too many rejects, too few tokens, empty window)."""


class RegistryError(FlywheelError):
    """The model registry refused or could not be reached."""


class StorageError(FlywheelError):
    """Object storage (S3, GCS) or a storage path could not be read or written."""
