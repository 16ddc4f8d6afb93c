"""Precomputed VAE latent distributions and text embeddings, as safetensors shards (video
clips as (C, F, h, w) latents, their frames encoded one by one).

``diffpo cache CONFIG`` (or ``cache.enabled: true`` in a training config) encodes every pair once;
training from the cache then never runs the VAE encoder or the text encoders. The cache folder is
named by a hash of everything that changes its contents (model source and revision, VAE and text
encoder configs and a fingerprint of their weights, resolution, crop, flip views, frame count and
stride of video clips, dataset fingerprint and selected rows, dtype), so a stale cache is never
reused: a change makes a new key, even for a model replaced in place. ``meta.json`` is written
last, marks a complete cache and records what it was built for; a cache folder passed where the
cache root belongs is checked against it and refused, naming the difference, when it was built for
another model or data. Shards are written to a temporary name and renamed, so an interrupted build
resumes from the last whole shard; each shard's metadata lists the bad samples it skipped
(``bad_samples.jsonl``).
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

from diffpo.data.bad_samples import BAD_SAMPLES_FILE, skipped_records
from diffpo.data.pairs import DataError, PreferencePairs, collate_pairs, flip_decisions
from diffpo.dtypes import DTYPES

FORMAT_VERSION = 2
TEXT_KEYS = ("hidden", "pooled")  # the text-encoder outputs among a shard's tensors
BUILT_FOR = ("source", "revision", "family", "weights", "resolution", "crop", "flip_views", "frames", "dataset", "rows",
             "dtype", "version")  # what meta.json records and a stale-cache message compares


def weights_fingerprint(modules, samples: int = 4096) -> str:
    """A hash of every parameter's shape and ``samples`` evenly strided values: cheap (no full
    pass over the weights) and different for any retrained or replaced encoder."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // samples)
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(flat[::stride].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def text_store_dtype(stack, dtype: str, text_dtype: str = "auto") -> str:
    """The dtype text embeddings are stored in: ``text_dtype``, or for ``auto`` the family's choice
    (bf16 for the T5 states of SD3 / FLUX: T5-XXL never has to run in training, at half the bytes)
    and else the latents' ``dtype``."""
    if text_dtype != "auto":
        return text_dtype
    return getattr(stack.family, "cache_text_dtype", None) or dtype


def cache_content(stack, dataset: PreferencePairs, dtype: str, text_dtype: str = "auto") -> dict:
    """Everything the cached tensors depend on."""
    content = {
        "version": FORMAT_VERSION,
        "source": stack.source,
        "revision": stack.revision,
        "family": stack.family.name,
        "vae": dict(stack.vae.config),
        "text_encoders": [enc.config.to_dict() for enc in stack.text_encoders],
        "weights": weights_fingerprint([stack.vae, *stack.text_encoders]),
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
    text_store = text_store_dtype(stack, dtype, text_dtype)
    if text_store != dtype:  # caches of text in the latents' dtype keep their keys
        content["text_dtype"] = text_store
    if getattr(stack, "max_sequence_length", None) is not None:
        content["max_sequence_length"] = stack.max_sequence_length
    return content


def _key(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(stack, dataset: PreferencePairs, dtype: str, text_dtype: str = "auto") -> str:
    """A hash of everything the cached tensors depend on."""
    return _key(cache_content(stack, dataset, dtype, text_dtype))


def _built_for(content: dict) -> dict:
    return {name: content[name] for name in BUILT_FOR if name in content}  # "frames": video caches only


def check_not_stale(folder: Path, content: dict) -> None:
    """Refuse the complete cache ``folder`` unless it was built for ``content`` (this run's model and data)."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("key") == _key(content):
        return
    built = meta.get("built_for") or {"version": meta.get("version"), "source": meta.get("source"),
                                      "resolution": meta.get("resolution"), "dtype": meta.get("dtype")}
    wanted = _built_for(content)
    differing = [name for name in BUILT_FOR if built.get(name) != wanted.get(name)] or ["model or data configuration"]
    shown = ", ".join(f"{name} {built.get(name)!r} != {wanted.get(name)!r}" if name in BUILT_FOR else name
                      for name in differing)
    raise DataError(f"cache {str(folder)!r} is stale: it was built for another model or data ({shown}); set "
                    f"cache.dir to the cache root (e.g. {str(folder.parent)!r}) so a matching cache is built, or delete it")


def build_cache(stack, dataset: PreferencePairs, cache_root: str | Path, dtype: str = "fp32", shard_size: int = 1024,
                batch_size: int = 16, progress: bool = True, process_index: int = 0, num_processes: int = 1,
                wait_for_everyone=lambda: None, text_dtype: str = "auto") -> Path:
    """Encode ``dataset`` into ``cache_root/<key>/``; returns the folder (reused when complete).

    ``cache_root`` may itself be a complete cache folder: it is used when it matches, refused
    (``DataError`` naming what differs) when it was built for another model or data. Text embeddings
    are stored in ``text_store_dtype(stack, dtype, text_dtype)``.
    Several processes share the work: process i encodes shards i, i + n, i + 2n, ...; after
    ``wait_for_everyone`` (a barrier) process 0 writes the empty prompt, ``bad_samples.jsonl``
    (from every shard's metadata) and ``meta.json``."""
    content = cache_content(stack, dataset, dtype, text_dtype)
    if (Path(cache_root) / "meta.json").is_file():
        check_not_stale(Path(cache_root), content)
        return Path(cache_root)
    folder = Path(cache_root) / _key(content)
    if (folder / "meta.json").is_file():
        check_not_stale(folder, content)
        return folder
    if process_index == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            from diffpo.trainers.preflight import output_dir_error

            raise output_dir_error(Path(cache_root), error, key="cache.dir") from None
    wait_for_everyone()
    store, text_store = DTYPES[dtype], DTYPES[text_store_dtype(stack, dtype, text_dtype)]
    views = dataset.flip != "none"
    saved_flip, saved_epoch = dataset.flip, dataset.epoch
    dataset.flip = "none"  # the cache holds the plain view (and the mirrored one when flipping)
    shards = []
    try:
        mine = [i for i in range(0, len(dataset), shard_size) if (i // shard_size) % num_processes == process_index]
        bar = tqdm(total=sum(min(shard_size, len(dataset) - i) for i in mine), desc="cache", disable=not progress)
        for shard_index, start in enumerate(range(0, len(dataset), shard_size)):
            name = f"shard-{shard_index:05d}.safetensors"
            stop = min(start + shard_size, len(dataset))
            shards.append({"file": name, "start": start, "stop": stop})
            if shard_index % num_processes != process_index:
                continue  # another process encodes it
            if (folder / name).is_file():
                bar.update(stop - start)
                continue
            parts: dict[str, list[torch.Tensor]] = {}
            shard_skipped = []
            for b in range(start, stop, batch_size):
                batch = collate_pairs([dataset[i] for i in range(b, min(b + batch_size, stop))])
                shard_skipped.extend(skipped_records(batch))
                for key, value in encode_batch(stack, batch, views).items():
                    kind = (text_store if key in TEXT_KEYS else store) if value.is_floating_point() else value.dtype
                    parts.setdefault(key, []).append(value.to("cpu", kind))
                bar.update(len(batch["index"]))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tmp = folder / (name + ".tmp")
            save_file(tensors, str(tmp), metadata={"skipped": json.dumps(shard_skipped)})
            os.replace(tmp, folder / name)
        bar.close()
    finally:
        dataset.flip, dataset.epoch = saved_flip, saved_epoch
    wait_for_everyone()  # every shard is on disk
    if process_index == 0:
        empty = stack.encode_prompts([""])
        empty_tensors = {"hidden": empty.hidden.cpu().to(text_store).contiguous()}
        if empty.pooled is not None:
            empty_tensors["pooled"] = empty.pooled.cpu().to(text_store).contiguous()
        save_file(empty_tensors, str(folder / "empty_prompt.safetensors"))
        # the shards' metadata, not this process's list: other processes (or an interrupted build) wrote some
        skipped = [record for shard in shards for record in
                   json.loads((safe_open(str(folder / shard["file"]), framework="pt").metadata() or {}).get("skipped", "[]"))]
        distinct = list({record["row"]: record for record in skipped}.values())
        (folder / BAD_SAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in distinct), encoding="utf-8")
        meta = {"version": FORMAT_VERSION, "key": _key(content), "pairs": len(dataset), "views": 2 if views else 1,
                "shards": shards, "bad_samples": len(distinct), "built_for": _built_for(content),
                "source": stack.source, "resolution": dataset.resolution, "dtype": dtype}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    wait_for_everyone()  # meta.json marks the cache complete for every process
    return folder


def cached_bad_samples(folder: str | Path) -> list[dict]:
    """The ``{"row", "error"}`` records of the bad samples skipped while building the cache."""
    path = Path(folder) / BAD_SAMPLES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
        if self.meta.get("version") != FORMAT_VERSION:
            raise DataError(f"cache {str(self.folder)!r} has format version {self.meta.get('version')}, this diffpo "
                            f"reads {FORMAT_VERSION}: delete it and rerun `diffpo cache`")
        if self.meta["pairs"] != len(captions):
            raise DataError(f"cache {str(self.folder)!r} holds {self.meta['pairs']} pairs but the dataset has "
                            f"{len(captions)}: it is stale; delete it and rerun `diffpo cache`")
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
