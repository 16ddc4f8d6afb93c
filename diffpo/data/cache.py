"""Precomputed VAE latent distributions and text embeddings, as safetensors shards (video
clips as (C, F, h, w) latents, their frames encoded one by one).

``diffpo cache CONFIG`` (or ``cache.enabled: true`` in a training config) encodes every pair once;
training from the cache then never runs the VAE encoder or the text encoders. The cache folder is
named by a hash of everything that changes its contents (model source and revision, VAE and text
encoder configs, resolution, crop, flip views, frame count and stride, dataset fingerprint and
selected rows, dtype), so a stale cache is never reused: a change makes a new key. ``meta.json``
is written last and marks a complete cache; shards are written to a temporary name and renamed,
so an interrupted build resumes from the last whole shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from diffpo.data.pairs import PreferencePairs, collate_pairs, flip_decisions
from diffpo.dtypes import DTYPES

FORMAT_VERSION = 1


def cache_key(stack, dataset: PreferencePairs, dtype: str) -> str:
    """A hash of everything the cached tensors depend on."""
    content = {
        "version": FORMAT_VERSION,
        "source": stack.source,
        "revision": stack.revision,
        "family": stack.family.name,
        "vae": dict(stack.vae.config),
        "text_encoders": [enc.config.to_dict() for enc in stack.text_encoders],
        "resolution": dataset.resolution,
        "crop": dataset.crop,
        "flip_views": dataset.flip != "none",
        "dataset": getattr(dataset.table, "_fingerprint", None),
        "columns": dataset.columns,
        "rows": hashlib.sha256(dataset.rows.tobytes()).hexdigest(),
        "dtype": dtype,
    }
    if dataset.num_frames is not None:  # video clips (image caches keep their keys)
        content["frames"] = {"num_frames": dataset.num_frames, "stride": dataset.frame_stride}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_cache(stack, dataset: PreferencePairs, cache_root: str | Path, dtype: str = "fp32", shard_size: int = 1024,
                batch_size: int = 16, progress: bool = True) -> Path:
    """Encode ``dataset`` into ``cache_root/<key>/``; returns the folder (reused when complete)."""
    folder = Path(cache_root) / cache_key(stack, dataset, dtype)
    if (folder / "meta.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    store = DTYPES[dtype]
    views = dataset.flip != "none"
    saved_flip, saved_epoch = dataset.flip, dataset.epoch
    dataset.flip = "none"  # the cache holds the plain view (and the mirrored one when flipping)
    shards = []
    try:
        bar = tqdm(total=len(dataset), desc="cache", disable=not progress)
        for shard_index, start in enumerate(range(0, len(dataset), shard_size)):
            name = f"shard-{shard_index:05d}.safetensors"
            stop = min(start + shard_size, len(dataset))
            shards.append({"file": name, "start": start, "stop": stop})
            if (folder / name).is_file():
                bar.update(stop - start)
                continue
            parts: dict[str, list[torch.Tensor]] = {}
            for b in range(start, stop, batch_size):
                batch = collate_pairs([dataset[i] for i in range(b, min(b + batch_size, stop))])
                for key, value in encode_batch(stack, batch, views).items():
                    parts.setdefault(key, []).append(value.to("cpu", store if value.is_floating_point() else value.dtype))
                bar.update(len(batch["index"]))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tmp = folder / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, folder / name)
        bar.close()
        empty = stack.encode_prompts([""])
        empty_tensors = {"hidden": empty.hidden.cpu().to(store).contiguous()}
        if empty.pooled is not None:
            empty_tensors["pooled"] = empty.pooled.cpu().to(store).contiguous()
        save_file(empty_tensors, str(folder / "empty_prompt.safetensors"))
    finally:
        dataset.flip, dataset.epoch = saved_flip, saved_epoch
    meta = {"version": FORMAT_VERSION, "pairs": len(dataset), "views": 2 if views else 1, "shards": shards,
            "source": stack.source, "resolution": dataset.resolution, "dtype": dtype}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def encode_batch(stack, batch: dict, flip_views: bool) -> dict[str, torch.Tensor]:
    """Latent mean/std of winners and losers (and their mirror images), text embeddings."""
    out = {}
    for side in ("w", "l"):
        pixels = batch[f"pixels_{side}"]
        out[f"mean_{side}"], out[f"std_{side}"] = stack.encode_images(pixels)
        if flip_views:
            out[f"mean_{side}_flip"], out[f"std_{side}_flip"] = stack.encode_images(pixels.flip(-1))
        out[f"original_size_{side}"] = batch[f"original_size_{side}"]
        out[f"crop_{side}"] = batch[f"crop_{side}"]
    text = stack.encode_prompts(batch["caption"])
    out["hidden"] = text.hidden
    if text.pooled is not None:
        out["pooled"] = text.pooled
    return out


class CachedPairs(torch.utils.data.Dataset):
    """Items of a complete cache folder, with the same flips a ``PreferencePairs`` would draw."""

    def __init__(self, folder: str | Path, captions: list[str], flip: str = "none", seed: int = 0):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a complete diffpo cache (no meta.json): rerun `diffpo cache`")
        self.meta = json.loads(meta_path.read_text())
        if flip != "none" and self.meta["views"] < 2:
            raise ValueError(f"cache {self.folder} was built without mirrored views; rebuild it with data.flip={flip}")
        self.captions, self.flip, self.seed, self.epoch = captions, flip, seed, 0
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return self.meta["pairs"]

    def start_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on the epoch (not ``set_epoch``: see trainers.common.EpochSampler)."""
        self.epoch = epoch

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        handle = safe_open(str(self.folder / "empty_prompt.safetensors"), framework="pt")
        return {k: handle.get_tensor(k) for k in handle.keys()}

    def _shard(self, index: int):
        for shard in self.meta["shards"]:
            if shard["start"] <= index < shard["stop"]:
                if shard["file"] not in self._open:
                    self._open[shard["file"]] = safe_open(str(self.folder / shard["file"]), framework="pt")
                return self._open[shard["file"]], index - shard["start"]
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict:
        handle, row = self._shard(index)
        flips = flip_decisions(self.seed, self.epoch, index, self.flip)
        item = {"index": index, "caption": self.captions[index]}
        for side, flip in (("w", flips[0]), ("l", flips[1])):
            suffix = "_flip" if flip else ""
            item[f"mean_{side}"] = handle.get_slice(f"mean_{side}{suffix}")[row]
            item[f"std_{side}"] = handle.get_slice(f"std_{side}{suffix}")[row]
            item[f"original_size_{side}"] = handle.get_slice(f"original_size_{side}")[row]
            item[f"crop_{side}"] = handle.get_slice(f"crop_{side}")[row]
        item["hidden"] = handle.get_slice("hidden")[row]
        if "pooled" in handle.keys():
            item["pooled"] = handle.get_slice("pooled")[row]
        return item

    def __getstate__(self):  # safetensors handles do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_open"] = {}
        return state
