"""User errors end the command with one line and a non-zero exit code, not a traceback."""

from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

# (errno, what the message says, the pattern writers that wrap the OS error put in their message)
_WRITE_FAILURES = (
    (errno.ENOSPC, "no space left on device", r"No space left on device|StorageFull|os error 28\b|Errno 28\b"),
    (errno.EDQUOT, "disk quota exceeded", r"[Dd]isk quota exceeded|QuotaExceeded|os error 122\b|Errno 122\b"),
    (errno.EFBIG, "file too large (a file-size limit, see ulimit -f)", r"File too large|FileTooLarge|os error 27\b|Errno 27\b"),
)


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


def write_failure(error: BaseException) -> str | None:
    """What a full disk, an exceeded quota or a file-size limit says, whether ``error`` is the
    OSError itself or a writer's own error wrapping it (safetensors, torch.save); else None."""
    for number, reason, pattern in _WRITE_FAILURES:
        if getattr(error, "errno", None) == number or re.search(pattern, str(error)):
            return reason
    return None


def is_disk_full(error: BaseException) -> bool:
    return write_failure(error) is not None


_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|Cannot allocate memory", re.IGNORECASE)
NEARLY_FULL_BYTES = 1 << 20  # a disk with less free space than this is taken to be why a write failed


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    import shutil

    path = Path(folder).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    return shutil.disk_usage(existing).free


class DiskFullError(OSError):
    """Writing failed for lack of space (or a quota / file-size limit); the message names the path and what to do."""


@contextmanager
def disk_full_names(folder: str | Path, then: str = "resume with resume_from=latest"):
    """Turn a full disk while writing into ``folder`` (any writer's error type) into a
    ``DiskFullError`` naming the file (when the OS gave one) or ``folder``, and ``then``: how to go on."""
    from diffpo.config import ConfigError
    from diffpo.data.images import BadSampleError
    from diffpo.data.pairs import DataError

    try:
        yield
    except (DiskFullError, ConfigError, DataError, BadSampleError, FloatingPointError):
        raise  # diffpo's own messages already say what happened
    except Exception as error:
        reason = write_failure(error)
        if reason is None:
            # torch.save reports ENOSPC as "unexpected pos ..." without an errno: judge by the disk itself
            free = free_bytes(folder)
            if free >= NEARLY_FULL_BYTES:
                raise
            reason = f"no space left on device ({free} bytes free; the writer said: {one_line(error)[:200]})"
        where = getattr(error, "filename", None) or folder
        raise DiskFullError(errno.ENOSPC, f"{reason} while writing {str(where)!r}: free space there or move the "
                            f"output to a larger disk, then {then}") from error


@contextmanager
def user_errors():
    """Print ``error: <message>`` and exit 2 for problems the user can fix; DIFFPO_DEBUG=1 re-raises."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        # torch.OutOfMemoryError (a RuntimeError) and the CPU allocator's "can't allocate memory"
        if os.environ.get("DIFFPO_DEBUG") or not isinstance(error, MemoryError) and not _OUT_OF_MEMORY.search(str(error)):
            raise
        size = re.search(r"allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", str(error))
        print(f"error: out of memory{f' (allocating {size.group(1)})' if size else ''}: lower the batch size or the "
              "resolution (data.resolution / train_batch_size, sampling.resolution / sampling.batch_size), or use a "
              "device with more memory", file=sys.stderr)
        raise SystemExit(2) from None
    except user_error_types() as error:
        if os.environ.get("DIFFPO_DEBUG"):
            raise
        if isinstance(error, DiskFullError):
            message = error.strerror
        elif isinstance(error, OSError) and is_disk_full(error):
            where = f" while writing {error.filename!r}" if error.filename else ""
            message = f"{write_failure(error)}{where}: free space or write somewhere else"
        else:
            message = one_line(error)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
