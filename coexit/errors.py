"""Exception types shared by every coexit package.

Errors carry a message a person can act on; the cloud service maps them to gRPC status codes at its boundary.
"""


class CoexitError(Exception):
    """Base class for every error coexit raises on purpose."""


class ConfigError(CoexitError, ValueError):
    """A config.json or early-exit block that cannot describe a valid model."""


class CheckpointError(CoexitError):
    """A checkpoint directory that cannot be read: missing files, wrong shapes, unknown architecture."""
