"""User errors end the command with one line and a non-zero exit code, not a traceback."""

from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

_DISK_FULL = re.compile(r"No space left on device|StorageFull|os error 28|Errno 28")


def user_error_types() -> tuple[type, ...]:
    from diffpo.config import ConfigError
    from diffpo.data.images import BadSampleError
    from diffpo.data.pairs import DataError

    return (ConfigError, DataError, BadSampleError, FileNotFoundError, FloatingPointError, OSError, ValueError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error re-raised from a DataLoader worker carries the
    worker's traceback in its message: only the original message is kept."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    return " ".join(text.split())


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, whether raised as an OSError or wrapped by a writer (safetensors, torch.save)."""
    return getattr(error, "errno", None) == errno.ENOSPC or bool(_DISK_FULL.search(str(error)))


class DiskFullError(OSError):
    """No space left while writing; the message names the path and what to do."""


@contextmanager
def disk_full_names(folder: str | Path, then: str = "resume with resume_from=latest"):
    """Turn a full disk while writing into ``folder`` (any writer's error type) into a
    ``DiskFullError`` naming the file (when the OS gave one) or ``folder``, and ``then``: how to go on."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        where = getattr(error, "filename", None) or folder
        raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {str(where)!r}: free space there or "
                            f"move the output to a larger disk, then {then}") from None


@contextmanager
def user_errors():
    """Print ``error: <message>`` and exit 2 for problems the user can fix; DIFFPO_DEBUG=1 re-raises."""
    try:
        yield
    except user_error_types() as error:
        if os.environ.get("DIFFPO_DEBUG"):
            raise
        if isinstance(error, DiskFullError):
            message = error.strerror
        elif isinstance(error, OSError) and is_disk_full(error):
            message = f"no space left on device{f' while writing {error.filename!r}' if error.filename else ''}: free space"
        else:
            message = one_line(error)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
