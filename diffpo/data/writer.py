"""Write preference pairs in the Pick-a-Pic column format (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``).

An image is stored as PNG bytes; a video (a list of PIL frames) as a list of PNG bytes, lossless,
which ``diffpo.data.videos`` reads back."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from diffpo.data.images import encode_png


def _encode(value):
    """PIL image -> PNG bytes; a list of frames -> a list of PNG bytes; bytes pass through."""
    if isinstance(value, Image.Image):
        return encode_png(value)
    if isinstance(value, (list, tuple)):
        return [_encode(frame) for frame in value]
    return bytes(value)


def write_pairs_parquet(path: str | Path, pairs: list[dict]) -> Path:
    """``pairs``: dicts with ``image_0``, ``image_1`` (PIL images, or lists of PIL frames for
    videos), ``label_0`` and ``caption``; any other scalar keys (scores, seeds) are kept as extra
    columns for auditing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not pairs:
        raise ValueError("no pairs to write")
    columns: dict[str, list] = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    extra = [k for k in pairs[0] if k not in ("image_0", "image_1", "label_0", "caption")]
    for key in extra:
        columns[key] = []
    for pair in pairs:
        for key, image_key in (("jpg_0", "image_0"), ("jpg_1", "image_1")):
            columns[key].append(_encode(pair[image_key]))
        columns["label_0"].append(float(pair["label_0"]))
        columns["caption"].append(str(pair["caption"]))
        for key in extra:
            columns[key].append(pair[key])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_images_parquet(path: str | Path, images: list, captions: list[str], extra: dict[str, list] | None = None) -> Path:
    """An image+caption table (``jpg_0``, ``caption``, and ``extra`` columns such as scores): what
    SePPO and other winners-only methods read. Videos are lists of PIL frames."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not images or len(images) != len(captions):
        raise ValueError(f"{len(images)} images and {len(captions)} captions: pass one caption per image")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"jpg_0": [_encode(image) for image in images], "caption": [str(c) for c in captions]}
    pq.write_table(pa.table({**columns, **(extra or {})}), path)
    return path
