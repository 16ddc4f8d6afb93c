"""``RUN_DIR/bad_samples.jsonl``: the samples a run skipped (``data.skip_bad_samples``), one JSON
line each, and their count for ``metrics.jsonl``.

The dataset replaces a bad pair by the next good one and reports the bad ones in each item's
``skipped`` list (see ``PreferencePairs.__getitem__``), so the information survives DataLoader
worker processes. Each process collects what its batches skipped; ``flush`` gathers them on every
process (a collective: call it where every process logs or checkpoints) and the main process
appends each distinct row once.
"""

from __future__ import annotations

import json
from pathlib import Path

BAD_SAMPLES_FILE = "bad_samples.jsonl"


def skipped_records(batch: dict) -> list[dict]:
    """The ``{"row", "error"}`` records a collated batch's items passed over (none for cached items)."""
    return [record for item_records in batch.get("skipped") or () for record in item_records]


class BadSampleLog:
    """Distinct bad samples of a run. ``start_micro_step``: where this (possibly resumed) run
    starts; lines a killed run wrote after its last checkpoint are dropped, since the resumed run
    meets those samples again."""

    def __init__(self, accelerator, run_dir: Path, start_micro_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(run_dir) / BAD_SAMPLES_FILE
        self.pending: list[dict] = []
        self.rows: set[int] = set()
        if accelerator.is_main_process:
            kept = []
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    if 0 <= record.get("micro_step", -1) < start_micro_step:
                        kept.append(record)
            self.rows = {r["row"] for r in kept}
        # rewritten at the first flush (the run has started by then), so a run that fails while it
        # sets up leaves an earlier run's file as it was
        self.kept: list[dict] | None = kept if accelerator.is_main_process else None

    @property
    def count(self) -> int:
        """Distinct bad samples met so far (exact on the main process)."""
        return len(self.rows)

    def add(self, records: list[dict], micro_step: int, step: int) -> None:
        """Note ``records`` met at ``micro_step`` (during optimizer step ``step``; -1/0: while caching)."""
        self.pending.extend({**r, "step": step, "micro_step": micro_step} for r in records)

    def flush(self) -> None:
        """Gather every process's pending records and append the new rows to the file."""
        pending, self.pending = self.pending, []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            pending = gather_object(pending)
        if not self.accelerator.is_main_process:
            return
        fresh = []
        for record in pending:
            if record["row"] not in self.rows:
                self.rows.add(record["row"])
                fresh.append(record)
        if self.kept is not None:
            kept, self.kept = self.kept, None
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept + fresh), encoding="utf-8")
        elif fresh:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in fresh))
