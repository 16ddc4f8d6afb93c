"""Prompt sets for evaluation: bundled PartiPrompts and shapes captions, text / TSV / CSV / JSONL
files, and ``datasets`` hub ids. Every prompt keeps its row index in the full set, so a subsample
gets the same seeds (and images) as the full set."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpo.eval.config import PromptSetConfig

BUNDLED = {"partiprompts": ("partiprompts", "PartiPrompts.tsv")}


@dataclass(frozen=True)
class PromptRecord:
    index: int  # row in the full prompt set: fixes the seeds
    prompt: str
    category: str | None = None


def bundled_prompts_dir() -> Path:
    from diffpo.resources import assets_dir

    return assets_dir() / "prompts"


def _format(config: PromptSetConfig) -> str:
    if config.format != "auto":
        return config.format
    if config.source in ("partiprompts", "shapes"):
        return config.source
    suffix = Path(config.source).suffix.lower()
    if suffix in (".txt", ".tsv", ".csv", ".jsonl"):
        return suffix[1:]
    if Path(config.source).exists():
        raise ValueError(f"prompts.source={config.source!r}: unknown file type; use .txt, .tsv, .csv or .jsonl "
                         "(or set prompts.format)")
    return "hub"


def _columns(config: PromptSetConfig, prompt: str, category: str | None) -> tuple[str, str | None]:
    category = category if config.category_column is None else (config.category_column or None)
    return config.prompt_column or prompt, category


def _table(rows: list[dict], where: str, prompt_col: str, category_col: str | None,
           category_optional: bool) -> list[PromptRecord]:
    records = []
    for n, row in enumerate(rows):
        if prompt_col not in row:
            raise ValueError(f"{where} row {n + 1}: no {prompt_col!r} column (has {sorted(row)}); set prompts.prompt_column")
        category = row.get(category_col) if category_col else None
        if category_col and category is None and not category_optional:
            raise ValueError(f"{where}: no {category_col!r} column; set prompts.category_column (\"\" for none)")
        records.append(PromptRecord(n, str(row[prompt_col]).strip(), None if category in (None, "") else str(category)))
    return records


def _read_file(path: Path, fmt: str, config: PromptSetConfig) -> list[PromptRecord]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts.source: prompt file {str(path)!r} not found")
    if fmt == "txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [PromptRecord(n, line) for n, line in enumerate(line for line in lines if line)]
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path} line {n}: not valid JSON") from None
        prompt_col, category_col = _columns(config, "prompt", "category")
        return _table(rows, str(path), prompt_col, category_col, category_optional=True)
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if fmt in ("tsv", "partiprompts") else ","))
    prompt_col, category_col = _columns(config, "Prompt", "Category")
    if rows and category_col and category_col not in rows[0] and config.category_column is None:
        category_col = None  # the default column is optional; a named one is not
    return _table(rows, str(path), prompt_col, category_col, category_optional=False)


def _read_hub(config: PromptSetConfig) -> list[PromptRecord]:
    import datasets

    try:
        data = datasets.load_dataset(config.source, split=config.split)
    except Exception as error:  # hub errors come in many classes; the message is what matters
        raise OSError(f"prompts.source={config.source!r} (split {config.split!r}) could not be loaded "
                      f"({error.__class__.__name__}): check the id, split and network, or pass a local file") from None
    prompt_col, category_col = _columns(config, "caption", None)
    for column in (prompt_col, category_col):
        if column and column not in data.column_names:
            raise ValueError(f"dataset {config.source!r} has no column {column!r}; it has {data.column_names}")
    prompts = data[prompt_col]
    categories = data[category_col] if category_col else [None] * len(prompts)
    return [PromptRecord(n, str(p).strip(), None if c is None else str(c)) for n, (p, c) in enumerate(zip(prompts, categories))]


def load_prompts(config: PromptSetConfig) -> list[PromptRecord]:
    """The prompt set ``config`` describes, filtered by category and subsampled reproducibly."""
    fmt = _format(config)
    if fmt == "shapes":
        from diffpo.data.shapes import parse_caption, shape_captions

        records = [PromptRecord(n, c, parse_caption(c).shape) for n, c in enumerate(shape_captions())]
    elif fmt == "partiprompts" and config.source == "partiprompts":
        folder, name = BUNDLED["partiprompts"]
        records = _read_file(bundled_prompts_dir() / folder / name, "tsv", config)
    elif fmt == "hub":
        records = _read_hub(config)
    else:
        records = _read_file(Path(config.source).expanduser(), fmt, config)
    if config.categories is not None:
        known = sorted({r.category for r in records if r.category is not None})
        unknown = [c for c in config.categories if c not in known]
        if unknown:
            raise ValueError(f"prompts.categories {unknown} are not in the prompt set; it has {known}")
        records = [r for r in records if r.category in config.categories]
    if not records:
        raise ValueError(f"prompts.source={config.source!r} holds no prompts")
    return subsample(records, config.max_prompts, config.subsample_seed)


def subsample(records: list[PromptRecord], count: int | None, seed: int) -> list[PromptRecord]:
    """``count`` records drawn without replacement with ``seed``, kept in their original order."""
    if count is None or count >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=count, replace=False))
    return [records[i] for i in keep]
