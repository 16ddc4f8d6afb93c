"""Ctrl-C (SIGINT) and SIGTERM end a long command with one line, not a traceback.

``stop_cleanly(args, argv)`` wraps a command: both signals raise ``Interrupted``, which unwinds the
command (its ``finally`` blocks run; a checkpoint being written stays a ``.tmp-`` folder that no
resume reads, so every complete checkpoint is intact and ``resume_from=latest`` continues exactly),
and then prints one line on stderr saying where the command stopped and the command that goes on,
and exits with 128 + the signal number: 130 for SIGINT, 143 for SIGTERM. The servers (``diffpo
label``, ``diffpo prompt serve``) install their own handlers, which finish the requests in flight.

Where a training run stopped is read from its run dir: the checkpoints and metrics this process
wrote (modified since it started) or the checkpoint it resumed from, never those an earlier run
left in the same folder.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt: no ``except Exception`` of a command swallows
    it, and code that expects Ctrl-C (a DataLoader worker forked with this handler) treats it as one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def _command(argv: list[str], extra: list[str] | None = None) -> str:
    return shlex.join(["diffpo", *[a for a in argv if not a.startswith("resume_from=")], *(extra or [])])


def _written_since(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started
    except OSError:
        return False


def _training_note(run_dir: Path, resume_from: str | None, argv: list[str], started: float,
                   command: str) -> str:
    from diffpo.trainers.common import STATE_FILE, checkpoint_dirs, resolve_resume

    found = checkpoint_dirs(run_dir)
    mine = [c for c in found if _written_since(c / STATE_FILE, started)]
    checkpoint = mine[-1] if mine else None
    if checkpoint is None and resume_from:
        try:
            earlier = [c for c in found if not _written_since(c / STATE_FILE, started)]
            checkpoint = (earlier[-1] if earlier else None) if resume_from == "latest" else resolve_resume(run_dir, resume_from)
        except Exception:  # an unusable resume_from: the run did not get far enough to matter
            checkpoint = None
    logged = None
    metrics = run_dir / "metrics.jsonl"
    if _written_since(metrics, started):
        lines = [line for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        try:
            logged = json.loads(lines[-1])["step"] if lines else None
        except (ValueError, KeyError, TypeError):
            logged = None
    where = f"after step {logged} (the last logged)" if logged is not None else "before its first logged step"
    if checkpoint is None:
        return (f"{where}, before its first checkpoint: nothing to resume; start again with `{_command(argv)}` "
                "(checkpoint_every sets how often a run saves)")
    step = json.loads((checkpoint / STATE_FILE).read_text()).get("global_step", "?")
    saved = run_dir / "config.yaml"
    again = (f"diffpo {command} {shlex.quote(str(saved))} resume_from=latest" if saved.is_file() else
             _command(argv, ["resume_from=latest"]))
    return f"{where}; the last checkpoint is {checkpoint} (step {step}): resume with `{again}`"


def where_it_stopped(args, argv: list[str], started: float) -> str:
    """Where the command of ``args`` stopped and how to go on, for the one line."""
    command = args.command
    sub = getattr(args, "data_command", None) or getattr(args, "prompt_command", None)
    again = _command(argv)
    try:
        if command == "train" or (command == "prompt" and sub == "train"):
            from diffpo.config import TrainConfig, load_config

            if command == "train":
                config = load_config(TrainConfig, args.config, args.overrides)
            else:
                from diffpo.prompt.config import PromptTrainConfig

                config = load_config(PromptTrainConfig, args.config, args.overrides)
            name = "train" if command == "train" else "prompt train"
            return _training_note(Path(config.output_dir), config.resume_from, argv, started, name)
    except Exception:  # the config itself is what was being read: no run to describe
        pass
    if command == "cache":
        return f"before it finished; finished cache shards are kept: rerun `{again}` to encode the rest"
    if command == "eval":
        return f"before it finished; images already generated are kept: rerun `{again}` to generate and score the rest"
    if command == "prompt" and sub == "pairs":
        return f"before it finished; prompts already in {Path(args.out) / 'candidates.jsonl'} are kept: rerun `{again}` to do the rest"
    return f"before it finished; nothing to resume: rerun `{again}` to start again"


@contextmanager
def stop_cleanly(args, argv: list[str] | None):
    """Turn SIGINT / SIGTERM during the command into one line and exit code 130 / 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.time() - 1  # file times are coarse on some file systems
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt as error:  # Interrupted included
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        for sig, handler in previous.items():  # a second Ctrl-C while the note is written ends at once
            signal.signal(sig, handler)
        previous = {}
        if os.environ.get("DIFFPO_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            name = " ".join(p for p in (args.command, getattr(args, "data_command", None),
                                        getattr(args, "prompt_command", None)) if p)
            print(f"interrupted by {signal.Signals(signum).name}: diffpo {name} stopped "
                  f"{where_it_stopped(args, argv, started)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
