"""``diffpo data top-k``: the K best images of a dataset by a reward head, as an image+caption
parquet (``jpg_0``, ``caption``, the score, where it came from). Expert sets for methods that need
no pairs (Diffusion-DRO's experts, SePPO's winners). Identical images (Pick-a-Pic repeats an image
in several pairs) are scored and kept once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm


def top_k_images(source: str, reward, k: int, image_columns: tuple[str, ...] = ("jpg_0", "jpg_1"),
                 caption_column: str = "caption", fmt: str = "auto", split: str = "train", batch_size: int = 64,
                 progress: bool = True) -> list[dict]:
    """Records {image (PIL), caption, score, row, column} of the ``k`` highest-scoring distinct images."""
    from diffpo.data.images import decode_image
    from diffpo.data.pairs import DataError, load_table
    from diffpo.eval.scoring import score_batch

    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    table = load_table(source, fmt, split)
    missing = [c for c in (*image_columns, caption_column) if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: no column(s) {missing} (has {table.column_names}); set --image-column / --caption-column")
    base_dir = Path(source).parent if source.endswith((".jsonl", ".json")) else None
    seen, scored, pending = set(), [], []

    def flush():
        scores = score_batch([p["image"] for p in pending], [p["caption"] for p in pending], {"reward": reward})["reward"]
        for record, score in zip(pending, scores):
            record["score"] = float(score)
            scored.append(record)
        scored.sort(key=lambda r: -r["score"])
        del scored[k:]  # only the best k stay in memory
        pending.clear()

    for row in tqdm(range(len(table)), desc="top-k", disable=not progress):
        record = table[row]
        for column in image_columns:
            value = record[column]
            key = hashlib.sha1(value if isinstance(value, bytes) else str(value).encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            image = decode_image(value, base_dir, where=f"row {row} column {column}")
            pending.append({"image": image, "caption": str(record[caption_column] or ""), "row": row, "column": column})
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    return scored


def write_top_k(records: list[dict], out: str | Path, reward_name: str) -> Path:
    from diffpo.data.writer import write_images_parquet

    return write_images_parquet(out, [r["image"] for r in records], [r["caption"] for r in records], extra={
        reward_name: [r["score"] for r in records], "source_row": [r["row"] for r in records],
        "source_column": [r["column"] for r in records]})
