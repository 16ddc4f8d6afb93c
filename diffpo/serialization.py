"""Reading and writing state without pickle.

Everything diffpo writes is safetensors (or JSON): a pickle file runs arbitrary code when it is
loaded, and a checkpoint or a round folder is exactly what gets copied between machines.

* ``save_state_file`` / ``load_state_file``: a nested state (dicts, lists, tuples of tensors,
  numpy arrays, numbers, strings, booleans, None; optimizer and scheduler state dicts, RNG states)
  as one ``.safetensors`` file: the tensors are its entries and the structure is JSON in its
  metadata, so types round-trip exactly (int dict keys, tuples, float vs int).
* ``load_torch_file``: third-party ``.pt`` / ``.bin`` / ``.ckpt`` weights with
  ``torch.load(weights_only=True)``, which refuses pickled code; ``.safetensors`` files directly.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

TREE_KEY = "diffpo_tree"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _encode(value, path: str, tensors: dict):
    """``value`` as JSON; its tensors go into ``tensors`` under numbered keys (``path`` is the
    place in the tree, for error messages)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value
        return {"$tensor": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        wide = value.dtype.kind == "u" and value.dtype.itemsize > 1  # torch lacks most unsigned types
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64 if wide else value.dtype))
        return {"$numpy": key, "dtype": value.dtype.str}
    if isinstance(value, (bool, str, np.bool_)) or value is None:
        return bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"$float": repr(value)}  # strict JSON has no NaN/inf
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{path or 'state'}: key {key!r} of type {type(key).__name__} cannot be stored")
            items.append([key, _encode(item, f"{path}.{key}" if path else str(key), tensors)])
        return {"$dict": items}
    if isinstance(value, (list, tuple)):
        encoded = [_encode(item, f"{path}.{i}" if path else str(i), tensors) for i, item in enumerate(value)]
        return {"$tuple": encoded} if isinstance(value, tuple) else encoded
    raise TypeError(f"{path or 'state'}: a {type(value).__name__} cannot be stored without pickle")


def _decode(value, tensors: dict, device):
    if isinstance(value, list):
        return [_decode(item, tensors, device) for item in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        tensor = tensors[value["$tensor"]]
        return tensor if device is None else tensor.to(device)
    if "$numpy" in value:
        return tensors[value["$numpy"]].numpy().astype(np.dtype(value["dtype"]))
    if "$float" in value:
        return float(value["$float"])
    if "$tuple" in value:
        return tuple(_decode(item, tensors, device) for item in value["$tuple"])
    return {key: _decode(item, tensors, device) for key, item in value["$dict"]}


def save_state_file(state, path: str | Path) -> Path:
    """Write ``state`` (see the module docstring for what it may hold) as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    seen, stored = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if pointer is not None and pointer in seen:  # safetensors refuses shared memory: copy repeats
            tensor = tensor.clone()
        seen.add(pointer)
        stored[key] = tensor
    save_file(stored, str(path), metadata={TREE_KEY: json.dumps(tree)})
    return Path(path)


def load_state_file(path: str | Path, device: str | torch.device | None = None):
    """The state ``save_state_file`` wrote to ``path``; tensors on ``device`` (None: the CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if TREE_KEY not in metadata:
            raise ValueError(f"{path} is a safetensors file without diffpo's state layout: it was not written by "
                             "diffpo's save_state_file")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return _decode(json.loads(metadata[TREE_KEY]), tensors, device)


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu"):
    """Weights from a third-party file: ``.safetensors`` directly, anything else with
    ``torch.load(weights_only=True)``. A pickle that would run code (or build arbitrary objects)
    when loaded is refused with one line naming the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"it references {found.group(1)}" if found else "it holds objects that are not tensors"
        raise ValueError(
            f"{path} is not a plain weights file ({what}; unpickling it could run code). diffpo loads .pt/.bin/.ckpt "
            "files only with torch.load(weights_only=True): get the checkpoint as safetensors, or re-save its "
            "state dict from a trusted environment"
        ) from None


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk, so that a rename that
    publishes ``folder`` never exposes files whose data is still only in the page cache."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str | Path) -> None:
    try:
        descriptor = os.open(str(path), os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
