"""User errors end the command with one line and a non-zero exit code, not a traceback."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def user_error_types() -> tuple[type, ...]:
    from diffpo.config import ConfigError
    from diffpo.data.images import BadSampleError
    from diffpo.data.pairs import DataError

    return (ConfigError, DataError, BadSampleError, FileNotFoundError, FloatingPointError, OSError, ValueError)


@contextmanager
def user_errors():
    """Print ``error: <message>`` and exit 2 for problems the user can fix; DIFFPO_DEBUG=1 re-raises."""
    try:
        yield
    except user_error_types() as error:
        if os.environ.get("DIFFPO_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
