"""What sits at a path that should be a regular file: missing, or a directory, FIFO, socket or device instead.

Used wherever a checkpoint file is opened (the safetensors index at load, the expert reader while serving), so
a directory or a named pipe in place of a shard is reported as what it is, never as "missing" (and a FIFO is
never opened for reading, which would wait for a writer forever).
"""

from __future__ import annotations

import os
import stat

from ..errors import CheckpointError, CheckpointNotFoundError


def describe(mode: int) -> str:
    """The kind of a non-regular file, for messages: "a directory", "a FIFO (named pipe)", ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_a_file_error(path, mode: int, what: str = "a safetensors file") -> CheckpointError:
    return CheckpointError(f"{path}: is {describe(mode)}, not {what}; put the file itself there")


def require_regular_file(path, missing: str, what: str = "a safetensors file") -> None:
    """Raises ``CheckpointNotFoundError(missing)`` if nothing is at ``path``, ``CheckpointError`` naming the kind
    if something other than a regular file is (symlinks are followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(missing) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot access it ({e.strerror or e}); check its permissions") from None
    if not stat.S_ISREG(mode):
        raise not_a_file_error(path, mode, what)
