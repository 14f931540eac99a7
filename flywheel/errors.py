"""Errors a user can act on. The CLI prints these as one line and exits non-zero."""


class FlywheelError(Exception):
    """Base for expected failures: bad input, unreachable services, refused actions."""

    exit_code = 1


class ConfigError(FlywheelError):
    """A profile or override is invalid. The message names the file and the field."""

    exit_code = 2


class DataError(FlywheelError):
    """Input data is unusable (too many rejects, too few tokens, empty window)."""


class RegistryError(FlywheelError):
    """The model registry refused or could not be reached."""


class StorageError(FlywheelError):
    """Object storage (S3, GCS) or a storage path could not be read or written."""
