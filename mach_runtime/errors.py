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


class ArchNotImplementedError(UnsupportedArchError, NotImplementedError):
    """The architecture is registered (detection, mach check) but load_moe cannot build its model yet."""


class ConfigError(MachError, ValueError):
    """A setting (argument, flag or environment variable) has an invalid value."""


class ExpertCacheTooSmallError(ConfigError):
    """The streaming expert bank cannot hold the experts one token needs."""


class RequestError(MachError, ValueError):
    """A request is invalid (empty prompt, max_tokens <= 0, bad sampling parameters, too long, ...)."""


class UnknownRequestError(RequestError, KeyError):
    """No live request has this id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RuntimeFailedError(MachError, RuntimeError):
    """The runtime gave up (an actor crashed more often than its restart limit allows) or was shut down."""


class DistributedError(RuntimeFailedError):
    """A rank of a distributed runtime died, stopped answering or diverged from rank 0 (docs/distributed.md):
    the group cannot continue; restart every rank."""


def error_name(exc: BaseException) -> str:
    """The name of ``exc``'s class if it is one of this module's errors (a request failed by it is reported to
    its caller as that class: a vanished shard stays a ``CheckpointNotFoundError``), else "RequestError"."""
    cls = type(exc)
    return cls.__name__ if isinstance(exc, MachError) and globals().get(cls.__name__) is cls else "RequestError"
