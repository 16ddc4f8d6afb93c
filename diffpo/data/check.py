"""``diffpo data check DATASET``: every problem of a preference dataset at once, before training.

Training stops at the first dataset-level problem and skips (or stops at) bad samples one by one;
this reads the whole dataset once and lists them all: unreadable files and JSONL lines, missing
columns, an empty dataset, all pairs ties, labels outside {0, 0.5, 1}, corrupt or truncated or
oversized images, images under ``MIN_IMAGE_SIDE`` pixels a side, unreadable video clips and clips
with fewer than ``data.num_frames`` frames, empty, non-UTF-8 or non-text captions, labels and
scores that are not numbers (text such as '1' included), by the rules training applies
(``images.read_image``, ``images.caption_text``, ``pairs.as_number``). Images that training converts
(grayscale, RGBA, CMYK, 16-bit, ...) or decodes at a reduced scale are counted, not reported as
problems. The report (JSON) holds every problem with its row (and parquet file) or JSONL line.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from diffpo.data.images import MIN_IMAGE_SIDE, BadSampleError, caption_text, read_image
from diffpo.data.videos import decode_video
from diffpo.data.pairs import (
    VALID_LABELS,
    DataError,
    as_number,
    detect_format,
    jsonl_lines,
    load_table,
    parquet_files,
    parquet_rows,
    undecoded_images,
)

EXAMPLES_SHOWN = 3  # per kind, in the printed summary; the report file lists all


@dataclass
class Problem:
    kind: str  # unreadable, missing_column, empty, all_ties, bad_label, corrupt_image, empty_caption, ...
    message: str
    row: int | None = None  # row as training numbers it (datasets row over the sorted files)
    where: str | None = None  # "pairs-01.parquet row 3", "line 7", a file name


@dataclass
class CheckReport:
    source: str
    rows: int = 0
    checked_rows: int = 0
    usable_pairs: int = 0
    ties: int = 0
    problems: list[Problem] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # stored image modes converted to RGB
    reduced: int = 0  # images decoded at a reduced scale (huge JPEGs)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, row: int | None = None, where: str | None = None) -> None:
        self.problems.append(Problem(kind, message, row, where))

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def to_dict(self) -> dict:
        return {"source": self.source, "ok": self.ok, "rows": self.rows, "checked_rows": self.checked_rows,
                "usable_pairs": self.usable_pairs, "ties": self.ties, "problem_counts": self.counts(),
                "converted_images": dict(self.converted), "reduced_scale_images": self.reduced,
                "problems": [vars(p) for p in self.problems]}

    def summary_lines(self) -> list[str]:
        head = (f"{self.source}: {self.checked_rows} of {self.rows} rows checked, {self.usable_pairs} usable pairs, "
                f"{self.ties} ties, {len(self.problems)} problem(s)")
        lines = [head]
        for kind, count in self.counts().items():
            shown = [p for p in self.problems if p.kind == kind][:EXAMPLES_SHOWN]
            examples = "; ".join(p.message for p in shown)
            lines.append(f"  {kind}: {count} ({examples}{'; ...' if count > len(shown) else ''})")
        if self.converted:
            modes = ", ".join(f"{mode} {n}" for mode, n in sorted(self.converted.items()))
            lines.append(f"  converted to RGB (not problems): {modes}")
        if self.reduced:
            lines.append(f"  decoded at a reduced scale (huge JPEGs, not problems): {self.reduced}")
        return lines


def _rows_of_jsonl(path: str, report: CheckReport):
    """(row, line number, record) of the good lines of a manifest; bad lines become problems."""
    rows = []
    for number, record, problem in jsonl_lines(path):
        if problem is not None:
            report.add("unreadable", f"line {number}: {problem}", where=f"line {number}")
        else:
            rows.append((len(rows), f"line {number}", record))
    return rows


def _parquet_table(source: str, report: CheckReport):
    """The readable, non-empty parquet files of ``source`` as one table, and a row -> file locator."""
    import datasets

    good, sizes = [], []
    files = parquet_files(source)
    if not files:
        report.add("unreadable", f"no parquet files found at {source!r}")
        return None, None
    for path in files:
        try:
            count = parquet_rows(path)
        except DataError as error:
            report.add("unreadable", str(error), where=path)
            continue
        if count:
            good.append(path)
            sizes.append(count)
    if not good:
        return [], None
    datasets.disable_progress_bars()
    try:
        table = undecoded_images(datasets.load_dataset("parquet", data_files=good, split="train"))
    except Exception as error:  # mismatched schemas between shards, mostly
        report.add("unreadable", f"the parquet files cannot be read as one table ({error.__class__.__name__}: "
                   f"{str(error).splitlines()[0] if str(error) else ''})")
        return None, None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def locate(row: int) -> str:
        index = max(i for i, start in enumerate(starts) if start <= row)
        return f"{os.path.basename(good[index])} row {row - starts[index]}"

    return table, locate if len(good) > 1 else (lambda row: f"row {row}")


def _table_rows(table, locate, batch_size: int = 64):
    row = 0
    for batch in table.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield row, locate(row), dict(zip(keys, values))
            row += 1


def _needed_columns(data, winners_only: bool, columns: list[str]) -> list[str]:
    plain = data.feedback_column is not None or (
        winners_only and data.image_1_column not in columns and data.label_column not in columns)
    needed = [data.image_0_column, data.caption_column] if plain else [
        data.image_0_column, data.image_1_column, data.label_column, data.caption_column]
    if data.feedback_column is not None:
        needed.append(data.feedback_column)
    return needed + list(data.score_columns or ())


def _number(value, allow_bool: bool = False) -> float | None:
    """A usable number by training's rule (``pairs.as_number``); NaN is not usable."""
    number = as_number(value, allow_bool)
    return number if number is not None and math.isfinite(number) else None


def check_dataset(data, winners_only: bool = False, max_rows: int | None = None, images: bool = True,
                  progress: bool = True) -> CheckReport:
    """Check the dataset a ``DataConfig`` describes; every problem goes into the report."""
    source = data.source
    report = CheckReport(source=source)
    if not source:
        report.add("unreadable", "no dataset given (data.source is empty)")
        return report
    fmt = detect_format(source) if data.format == "auto" else data.format
    base_dir = Path(source).parent if fmt == "jsonl" else None
    if fmt == "jsonl":
        if not os.path.isfile(source):
            report.add("unreadable", f"manifest {source!r} does not exist")
            return report
        with open(source, "rb") as handle:
            if handle.read(4) == b"PAR1":
                report.add("unreadable", f"{source!r} is a parquet file, but format=jsonl reads JSON lines: set "
                           "format=auto (or parquet)")
                return report
        rows = _rows_of_jsonl(source, report)
        columns = sorted({key for _, _, record in rows for key in record})
        total = len(rows)
    else:
        if fmt == "parquet":
            table, locate = _parquet_table(source, report)
        else:
            try:
                table, locate = load_table(source, fmt, data.split), (lambda row: f"row {row}")
            except DataError as error:
                report.add("unreadable", str(error))
                table = None
        if table is None:
            return report
        columns = list(table.column_names) if len(table) else []
        total = len(table)
        rows = _table_rows(table, locate) if total else []
    report.rows = total
    if total == 0:
        if not report.problems:  # not already explained by unreadable files or lines
            report.add("empty", "the dataset has no rows")
        return report

    needed = _needed_columns(data, winners_only, columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        report.add("missing_column", f"missing column(s) {missing}; it has {columns}: set data.image_0_column / "
                   "image_1_column / label_column / caption_column (as key=value here)")
    present = [c for c in needed if c in columns]
    paired = data.label_column in needed
    image_columns = [c for c in (data.image_0_column, data.image_1_column) if c in present and
                     (paired or c == data.image_0_column)]
    limit = total if max_rows is None else min(total, max_rows)
    labels_seen = 0
    for row, where, record in tqdm(rows, total=limit, desc="check", disable=not progress):
        if row >= limit:
            break
        report.checked_rows += 1
        bad = False
        if paired and data.label_column in present:
            label = _number(record.get(data.label_column))
            if label is None or label not in VALID_LABELS:
                value = record.get(data.label_column)
                what = "is text, not a number (0, 0.5 or 1)" if isinstance(value, str) else "is not 0, 0.5 or 1"
                report.add("bad_label", f"{where}: {data.label_column}={value!r} {what}", row, where)
                bad = True
            else:
                labels_seen += 1
                if label == 0.5:
                    report.ties += 1
                    bad = bad or not data.keep_ties
        if data.feedback_column in present:
            if _number(record.get(data.feedback_column), allow_bool=True) not in (0.0, 1.0):
                report.add("bad_feedback", f"{where}: {data.feedback_column}={record.get(data.feedback_column)!r} "
                           "is not 0 or 1", row, where)
                bad = True
        for column in data.score_columns or ():
            if column in present and _number(record.get(column)) is None:
                report.add("bad_score", f"{where}: {column}={record.get(column)!r} is not a number", row, where)
                bad = True
        if data.caption_column in present:
            try:
                caption_text(record.get(data.caption_column), f"{where} column {data.caption_column}",
                             data.allow_empty_captions)
            except BadSampleError as error:
                kind = ("caption_not_utf8" if "UTF-8" in str(error) else
                        "caption_not_text" if "not text" in str(error) else "empty_caption")
                report.add(kind, str(error), row, where)
                bad = True
        if images and data.num_frames is not None:  # video clips: every frame readable, enough of them
            for column in image_columns:
                try:
                    decode_video(record.get(column), base_dir, f"{where} column {column}", data.num_frames,
                                 data.frame_stride)
                except BadSampleError as error:
                    kind = "too_few_frames" if "data.num_frames=" in str(error) else "corrupt_video"
                    report.add(kind, str(error), row, where)
                    bad = True
        elif images:
            for column in image_columns:
                try:
                    decoded = read_image(record.get(column), base_dir, where=f"{where} column {column}",
                                         min_side=data.resolution or 512, min_size=MIN_IMAGE_SIDE)
                except BadSampleError as error:
                    kind = "too_small_image" if "-pixel minimum side" in str(error) else "corrupt_image"
                    report.add(kind, str(error), row, where)
                    bad = True
                    continue
                if decoded.mode != "RGB":
                    report.converted[decoded.mode] += 1
                report.reduced += decoded.reduced
        report.usable_pairs += not bad and not missing
    if paired and labels_seen and report.ties == labels_seen and not data.keep_ties:
        report.add("all_ties", f"all {labels_seen} pairs with a valid label are ties (label 0.5): nothing to learn; "
                   "use other data or set keep_ties=true")
    return report


def write_report(report: CheckReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
