"""Preference pairs: Pick-a-Pic-format parquet, JSONL manifests and ``datasets`` ids.

Every source is read through ``datasets`` (memory-mapped Arrow, so a multi-GB parquet folder is
not loaded into RAM). A row holds two images, a caption and ``label_0`` (1: image 0 preferred,
0: image 1 preferred, 0.5: tie). Each item is ordered winner first and augmented with a generator
seeded by (seed, epoch, index), so a resumed run sees exactly the same pixels. With ``num_frames``
set the two "images" are videos (GIF/MP4 files, frame folders, encoded bytes or lists of frames;
``diffpo.data.videos``): every frame gets the same crop and flip, pixels are (F, 3, R, R).
"""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from diffpo.data.images import MIN_IMAGE_SIDE, BadSampleError, caption_text, read_image, resize_and_crop, resized_shape
from diffpo.data.videos import decode_video

VALID_LABELS = (0.0, 0.5, 1.0)


class DataError(ValueError):
    """A dataset problem (missing column, no pairs left); the message says what to change."""


def as_number(value, allow_bool: bool = False) -> float | None:
    """``value`` as a float when it is a number (int, float, numpy number; NaN included), else None:
    text such as ``'1'``, lists and null are not numbers, nor booleans unless ``allow_bool`` (binary
    feedback: a thumbs-up column). Training and ``diffpo data check`` judge labels, feedback and
    scores by this one rule."""
    if isinstance(value, (bool, np.bool_)):
        return float(value) if allow_bool else None
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def numeric_column(table, column: str, allow_bool: bool = False) -> np.ndarray:
    """A column as float64 (null -> NaN); DataError naming the first row that is not a number."""
    values = table[column]
    numbers = []
    for row, value in enumerate(values):
        number = as_number(value, allow_bool) if value is not None else math.nan
        if number is None:
            kind = "text" if isinstance(value, str) else type(value).__name__
            raise DataError(f"column {column} must hold numbers; row {row} has {value!r} ({kind}): store it as a "
                            "number column (0, 0.5 or 1 for labels)")
        numbers.append(number)
    return np.asarray(numbers, dtype=np.float64)


def detect_format(source: str) -> str:
    if source.endswith((".jsonl", ".json")):
        return "jsonl"
    if source.endswith(".parquet") or os.path.isdir(source) or any(ch in source for ch in "*?["):
        return "parquet"
    return "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "org/name"


def looks_local(source: str) -> bool:
    """True when ``source`` can only mean a local path: absolute, ``./``, ``~``, a trailing slash,
    deeper than ``org/name``, or its first part is an existing local folder. A hub id is
    ``name`` or ``org/name``."""
    first = source.split("/", 1)[0]
    return (not _HUB_ID.match(source) or source.startswith(("/", "./", "../", "~")) or source.endswith("/")
            or ("/" in source and os.path.isdir(first)))


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: ``datasets`` wraps the reader's error in its own."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0]}" if text else error.__class__.__name__


def parquet_files(source: str) -> list[str]:
    """The parquet files ``source`` (a file, a folder searched recursively, or a glob) names, sorted."""
    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    return sorted(glob.glob(source))


def parquet_rows(path: str) -> int:
    """Rows of a parquet file, from its footer; DataError naming the file when it is not parquet."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for truncated or foreign files
        raise DataError(f"{path}: not a readable parquet file ({_root_cause(error)}): re-export or remove it") from None


def jsonl_lines(path: str):
    """(line number, record, problem) for every non-blank line of a JSONL manifest: the record when
    the line is a UTF-8 JSON object (problem None), else None and what is wrong with the line."""
    import json

    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, None, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            except ValueError as error:
                yield number, None, f"not valid JSON ({error})"
            else:
                if isinstance(record, dict):
                    yield number, record, None
                else:
                    yield number, None, f"a JSON {type(record).__name__}, not an object of column values"


def jsonl_problems(path: str, limit: int | None = None) -> list[tuple[int, str]]:
    """(line number, problem) for lines of a JSONL manifest that are not UTF-8 JSON objects."""
    problems = []
    for number, _, problem in jsonl_lines(path):
        if problem is not None:
            problems.append((number, problem))
            if limit is not None and len(problems) >= limit:
                break
    return problems


def _jsonl_is_empty(path: str) -> bool:
    with open(path, "rb") as handle:
        return not any(line.strip() for line in handle)


def undecoded_images(table):
    """``table`` with its ``datasets.Image`` columns left encoded: diffpo decodes each image itself,
    so a corrupt one becomes a ``BadSampleError`` naming its row instead of a crash inside ``datasets``."""
    import datasets

    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(name, datasets.Image(decode=False))
    return table


def load_table(source: str, fmt: str = "auto", split: str = "train"):
    """A ``datasets.Dataset`` from a parquet file/folder/glob, a JSONL manifest or a hub id.

    Empty parquet files (0 rows) are left out; a source with no rows at all, an unreadable file or a
    JSONL line that is not UTF-8 JSON raises ``DataError`` naming the file (and line)."""
    import datasets

    if not source:
        raise DataError("data.source is empty: set it to a parquet file/folder, a .jsonl manifest or a datasets id")
    fmt = detect_format(source) if fmt == "auto" else fmt
    datasets.disable_progress_bars()
    if fmt == "parquet":
        files = parquet_files(source)
        if not files:
            raise DataError(f"data.source={source!r}: no parquet files found there")
        files = [f for f in files if parquet_rows(f) > 0]  # datasets cannot read a 0-row file
        if not files:
            raise DataError(f"data.source={source!r}: the dataset is empty (its parquet files hold 0 rows)")
        try:
            return undecoded_images(datasets.load_dataset("parquet", data_files=files, split="train"))
        except Exception as error:
            raise DataError(f"data.source={source!r}: could not read the parquet files ({_root_cause(error)}); "
                            "check them with `diffpo data check`") from None
    if fmt == "jsonl":
        if not os.path.isfile(source):
            raise DataError(f"data.source={source!r}: manifest file does not exist")
        with open(source, "rb") as handle:
            if handle.read(4) == b"PAR1":
                raise DataError(f"data.source={source!r} is a parquet file, but data.format=jsonl reads JSON lines: "
                                "set data.format=auto (or parquet)")
        if _jsonl_is_empty(source):
            raise DataError(f"data.source={source!r}: the dataset is empty (no JSON lines)")
        # checked by hand first: the JSON reader may replace bytes that are not UTF-8 without a word
        bad = jsonl_problems(source)
        if bad:
            line, what = bad[0]
            raise DataError(f"data.source={source!r}: line {line} is {what}" +
                            (f" ({len(bad) - 1} more bad lines)" if len(bad) > 1 else "") +
                            f"; fix or remove them (`diffpo data check {source}` lists all)")
        try:
            return undecoded_images(datasets.load_dataset("json", data_files=source, split="train"))
        except Exception as error:
            raise DataError(f"data.source={source!r}: could not read it as JSON lines ({_root_cause(error)}); "
                            "every line must be an object with the same column types") from None
    if looks_local(source):
        raise DataError(f"data.source={source!r} does not exist (no such local file or folder): check the path; "
                        "a parquet file/folder/glob, a .jsonl manifest, or a datasets hub id like 'org/name'")
    try:
        return undecoded_images(datasets.load_dataset(source, split=split))
    except Exception as error:
        from diffpo.hub import unreachable

        raise DataError(f"data.source: {unreachable('the dataset', source, error, 'local parquet files', 'dataset')}") from None


def flip_decisions(seed: int, epoch: int, index: int, mode: str) -> tuple[bool, bool]:
    """Whether to flip the winner and the loser image of pair ``index`` in ``epoch``."""
    if mode == "none":
        return False, False
    rng = np.random.default_rng([seed, epoch, index, 1])
    if mode == "joint":
        flip = bool(rng.random() < 0.5)
        return flip, flip
    return bool(rng.random() < 0.5), bool(rng.random() < 0.5)


class PreferencePairs(torch.utils.data.Dataset):
    """Winner-first preference pairs with pixels in [-1, 1] and SDXL micro-conditioning."""

    def __init__(
        self,
        table,
        resolution: int,
        image_0_column: str = "jpg_0",
        image_1_column: str = "jpg_1",
        label_column: str = "label_0",
        caption_column: str = "caption",
        keep_ties: bool = False,
        max_pairs: int | None = None,
        crop: str = "center",
        flip: str = "none",
        seed: int = 0,
        base_dir: str | Path | None = None,
        winners_only: bool = False,
        score_columns: list[str] | None = None,
        feedback_column: str | None = None,
        skip_bad_samples: bool = True,
        allow_empty_captions: bool = False,
        num_frames: int | None = None,
        frame_stride: int = 1,
    ):
        # winners_only (SePPO): only the preferred image is read; a plain image+caption table
        # (no image_1 / label column) counts as all winners. feedback_column (Diffusion-KTO, unpaired):
        # one image per row with its own binary label, read as the item's "desirable"
        winners_only = winners_only or feedback_column is not None
        plain = feedback_column is not None or (
            winners_only and image_1_column not in table.column_names and label_column not in table.column_names)
        needed = (image_0_column, caption_column) if plain else (image_0_column, image_1_column, label_column, caption_column)
        if feedback_column is not None:
            needed = (*needed, feedback_column)
        if score_columns is not None and len(score_columns) != 2:
            raise DataError(f"data.score_columns={score_columns} must name two columns: the scores of image 0 and image 1")
        needed = (*needed, *(score_columns or ()))
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DataError(
                f"dataset is missing column(s) {missing}; it has {table.column_names}: set data.image_0_column / "
                "image_1_column / label_column / caption_column"
            )
        labels = np.ones(len(table)) if plain else numeric_column(table, label_column)
        self.feedback = None
        if feedback_column is not None:
            self.feedback = numeric_column(table, feedback_column, allow_bool=True)  # true/false: 1/0
            bad = ~np.isin(self.feedback, (0.0, 1.0))
            if bad.any():
                raise DataError(f"{feedback_column} must be 1 (desirable) or 0 (undesirable); row {int(np.argmax(bad))} "
                                f"has {self.feedback[bad][0]}")
        bad = ~np.isin(labels, VALID_LABELS)
        if bad.any():
            raise DataError(f"{label_column} must be 0, 0.5 or 1 but {int(bad.sum())} row(s) are not (first: row "
                            f"{int(np.argmax(bad))} has {labels[bad][0]}): fix or drop them, or set data.label_column")
        rows = np.arange(len(labels)) if keep_ties else np.flatnonzero(labels != 0.5)
        if max_pairs is not None:
            rows = rows[:max_pairs]
        if len(rows) == 0:
            what = "every pair is a tie (label 0.5)" if len(labels) else "the dataset is empty"
            raise DataError(f"no preference pairs to train on: {what}; set data.keep_ties=true or use other data")
        self.table, self.rows, self.labels = table, rows, labels
        self.columns = (image_0_column, image_1_column, caption_column)
        self.resolution, self.crop, self.flip, self.seed = resolution, crop, flip, seed
        self.base_dir = Path(base_dir) if base_dir else None
        self.winners_only = winners_only
        self.score_columns = score_columns
        self.skip_bad_samples, self.allow_empty_captions = skip_bad_samples, allow_empty_captions
        self.num_frames, self.frame_stride = num_frames, frame_stride  # num_frames None: images
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def start_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on the epoch (not ``set_epoch``: see trainers.common.EpochSampler)."""
        self.epoch = epoch

    def score_margins(self) -> np.ndarray:
        """s_w − s_l per pair (winner first) from ``data.score_columns``: the curriculum's ordering key."""
        if not self.score_columns:
            raise DataError("a curriculum orders pairs by reward margin: set data.score_columns (e.g. [reward_0, reward_1])")
        score_0, score_1 = (np.asarray(self.table[c], dtype=np.float64)[self.rows] for c in self.score_columns)
        sign = np.where(self.labels[self.rows] >= 0.5, 1.0, -1.0)  # the same winner rule as __getitem__
        return sign * (score_0 - score_1)

    def caption(self, index: int) -> str:
        """The caption of pair ``index`` for messages and logs ('' when it is unusable)."""
        row = int(self.rows[index])
        try:
            return caption_text(self.table[row][self.columns[2]], allow_empty=self.allow_empty_captions)
        except BadSampleError:
            return ""

    def __getitem__(self, index: int) -> dict:
        """Pair ``index``; with ``skip_bad_samples`` a bad pair (corrupt image, empty or non-UTF-8
        caption) is replaced by the next good one in index order, and the item's ``skipped`` lists
        the bad ones passed over (``{"row", "error"}``), so a loader batch keeps its size and a
        resumed run meets the same replacements. Without it the first bad pair raises."""
        skipped = []
        for offset in range(len(self.rows)):
            candidate = (index + offset) % len(self.rows)
            try:
                item = self._item(candidate)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise BadSampleError(f"{error} (data.skip_bad_samples=false; set it to true to skip such "
                                         "samples, or list every problem with `diffpo data check`)") from None
                skipped.append({"row": int(self.rows[candidate]), "error": str(error)})
                continue
            item["skipped"] = skipped
            return item
        raise DataError(f"every one of the {len(self.rows)} pairs is bad (first: {skipped[0]['error']}): "
                        "run `diffpo data check` on data.source")

    def _item(self, index: int) -> dict:
        row = int(self.rows[index])
        record = self.table[row]
        col0, col1, col_caption = self.columns
        label = self.labels[row]
        first, second = (col0, col1) if label >= 0.5 else (col1, col0)
        rng = np.random.default_rng([self.seed, self.epoch, index, 0])
        flips = flip_decisions(self.seed, self.epoch, index, self.flip)
        caption = caption_text(record[col_caption], f"row {row} column {col_caption}", self.allow_empty_captions)
        item = {"index": index, "caption": caption, "label": float(label)}
        if self.feedback is not None:
            item["desirable"] = float(self.feedback[row])
        if self.score_columns:  # reward scores of winner and loser (SmPO's soft labels)
            score_0, score_1 = (_score(record[c], f"row {row} column {c}") for c in self.score_columns)
            item["score_w"], item["score_l"] = (score_0, score_1) if label >= 0.5 else (score_1, score_0)
        sides = (("w", first, flips[0]),) if self.winners_only else (("w", first, flips[0]), ("l", second, flips[1]))
        for name, column, flip in sides:
            where = f"row {row} column {column}"
            if self.num_frames is None:
                decoded = read_image(record[column], self.base_dir, where=where, min_side=self.resolution,
                                     min_size=MIN_IMAGE_SIDE)
                frames, original_size = [decoded.image], decoded.original_size
            else:
                frames = decode_video(record[column], self.base_dir, where, self.num_frames, self.frame_stride)
                original_size = frames[0].size
            image = frames[0]
            crop = None
            if self.crop == "random":
                h, w = resized_shape(image.size, self.resolution)
                crop = (int(rng.integers(0, h - self.resolution + 1)), int(rng.integers(0, w - self.resolution + 1)))
            pixels, crop = resize_and_crop(image, self.resolution, crop)
            if self.num_frames is not None:  # every frame cropped where the first was: (F, 3, R, R)
                pixels = torch.stack([pixels] + [resize_and_crop(f, self.resolution, crop)[0] for f in frames[1:]])
            if flip:
                pixels = pixels.flip(-1)
            width, height = original_size
            item[f"pixels_{name}"] = pixels
            item[f"original_size_{name}"] = torch.tensor([height, width])
            item[f"crop_{name}"] = torch.tensor(crop)
        return item


def _score(value, where: str) -> float:
    score = as_number(value)
    if score is None:
        raise BadSampleError(f"{where}: the score {value!r} is not a number")
    if not np.isfinite(score):
        raise BadSampleError(f"{where}: the score is {score}")
    return score


def collate_pairs(items: list[dict]) -> dict:
    """Stack items into a batch; ``index`` stays a list of ints on the host (per-pair random
    streams are seeded from it, and reading it off an accelerator would wait for the device)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "index":
            batch[key] = [int(v) for v in values]
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def build_pairs(data_config, resolution: int, seed: int, winners_only: bool = False) -> PreferencePairs:
    """The training dataset a ``DataConfig`` describes (``winners_only``: the preferred images alone)."""
    table = load_table(data_config.source, data_config.format, data_config.split)
    base_dir = Path(data_config.source).parent if data_config.source.endswith((".jsonl", ".json")) else None
    return PreferencePairs(
        table,
        resolution=resolution,
        image_0_column=data_config.image_0_column,
        image_1_column=data_config.image_1_column,
        label_column=data_config.label_column,
        caption_column=data_config.caption_column,
        keep_ties=data_config.keep_ties,
        max_pairs=data_config.max_pairs,
        crop=data_config.crop,
        flip=data_config.flip,
        seed=seed,
        base_dir=base_dir,
        winners_only=winners_only,
        score_columns=data_config.score_columns,
        feedback_column=data_config.feedback_column,
        skip_bad_samples=data_config.skip_bad_samples,
        allow_empty_captions=data_config.allow_empty_captions,
        num_frames=data_config.num_frames,
        frame_stride=data_config.frame_stride,
    )
