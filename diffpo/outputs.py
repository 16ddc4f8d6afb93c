"""No command writes over one of its own inputs.

``check_not_an_input(out, inputs)`` is called before a command does any work: it refuses an output
file that is one of the input files (compared as resolved paths, and with ``os.path.samefile`` so
that links and ``./x`` vs ``/abs/x`` count as the same file), that is an input folder itself, or
that lies inside an input folder with a name that folder's reader picks up (a ``.parquet`` report
inside a parquet dataset folder, a ``.png`` inside an image folder). The message names the output option, the input and a way out.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path


def same_path(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (links and relative paths resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str | Path, folder: str | Path) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder and path != folder


def check_not_an_input(out: str | Path, inputs: dict[str, str | Path | None], option: str = "--out",
                       read_suffixes: tuple[str, ...] = (".parquet",)) -> None:
    """Raise ``ValueError`` when writing ``out`` would replace or join one of ``inputs`` (``{what: path}``;
    a path may be a file, a folder or a glob; None is skipped). ``read_suffixes``: the files an input
    folder's reader picks up."""
    for what, value in inputs.items():
        if not value:
            continue
        value = str(value)
        files = sorted(glob.glob(value)) if any(ch in value for ch in "*?[") and not os.path.exists(value) else [value]
        for source in files:
            if same_path(out, source):
                kind = "folder" if os.path.isdir(source) else "file"
                raise ValueError(f"{option} {str(out)!r} is the {what} {kind} {source!r}: writing there would destroy "
                                 f"the input; pass another {option}")
            if os.path.isdir(source) and _inside(out, source) and str(out).lower().endswith(read_suffixes):
                raise ValueError(f"{option} {str(out)!r} lies inside the {what} folder {source!r}, where it would "
                                 f"replace or join the files read from it: pass an {option} outside it")
