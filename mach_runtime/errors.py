"""The project's own exception types.

Every error a user can cause (bad path, bad config, corrupt file, unknown arch, bad request) raises one of
these, with a message that names the file or field and says how to fix it.
"""

from __future__ import annotations


class MachError(Exception):
    """Base class of every error mach_runtime raises on purpose."""


class CheckpointError(MachError, ValueError):
    """A checkpoint directory or one of its files is missing, malformed or inconsistent."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path (or a file it needs) does not exist."""


class UnsupportedArchError(CheckpointError):
    """config.json names a model_type that no adapter in the registry handles."""


class ConfigError(MachError, ValueError):
    """A setting (argument, flag or environment variable) has an invalid value."""


class ExpertCacheTooSmallError(ConfigError):
    """The streaming expert bank cannot hold the experts one token needs."""
