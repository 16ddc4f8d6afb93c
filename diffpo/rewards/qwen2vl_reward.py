"""What the Qwen2-VL reward models (HPSv3, VideoAlign's VideoReward) share: their checkpoints'
key names, the backbone built from a config and loaded once, and the forward that reads a small
reward head at special tokens.

Both released models subclass transformers 4.4x's ``Qwen2VLForConditionalGeneration``, add an
``rm_head`` applied in fp32 to the last hidden states, and read it where the prompt holds their
special tokens (``<|Reward|>``; ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``). Their
forward calls the language model with ``position_ids=None``, which in those versions meant plain
sequential positions on all three M-RoPE axes (not the 3-D image positions ``generate`` uses);
the models were trained that way, so ``reward_logits`` does the same.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from diffpo.rewards.weights import looks_like_hub_id

IMAGE_FACTOR = 28  # Qwen2-VL: 14-px patches merged 2 x 2


def canonical_key(key: str) -> str | None:
    """One released name in ``Qwen2VLModel``'s naming (transformers 5), ``rm_head.*`` kept, None for
    what a reward model never uses (``lm_head``, peft's frozen ``original_module`` copies).
    Accepted: transformers 4.4x (``model.layers.*``, ``visual.*``), transformers 5
    (``model.language_model.*``, ``model.visual.*``), under peft's ``base_model.model.`` prefix or
    its ``modules_to_save.default`` wrapper."""
    key = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    if ".original_module." in key or key.startswith("lm_head."):
        return None
    if key.startswith(("model.language_model.", "model.visual.")):
        return key.removeprefix("model.")
    if key.startswith("model."):
        return "language_model." + key.removeprefix("model.")
    if key.startswith(("visual.", "language_model.", "rm_head.")):
        return key
    raise ValueError(f"not a Qwen2-VL reward checkpoint: unexpected key {key!r}")


def split_checkpoint(state: dict) -> tuple[dict, dict]:
    """(backbone, rm_head) state dicts of a released checkpoint, names by ``canonical_key``."""
    backbone, head = {}, {}
    for key, value in state.items():
        name = canonical_key(key)
        if name is None:
            continue
        if name.startswith("rm_head."):
            head[name.removeprefix("rm_head.")] = value
        else:
            backbone[name] = value
    if not head:
        raise ValueError("not a Qwen2-VL reward checkpoint: it has no rm_head.* weights")
    return backbone, head


def load_config(source: str, what: str, default: str):
    """A ``Qwen2VLConfig`` from a folder, a config.json or a hub id, with a one-line error."""
    from transformers import Qwen2VLConfig

    hint = f"pass arch= a folder or config.json of {default} (its config is all that is read)"
    if source.endswith(".json") and os.path.isfile(source):
        return Qwen2VLConfig.from_json_file(source)
    if not os.path.exists(source) and not looks_like_hub_id(source):
        raise FileNotFoundError(f"{what} config not found at {source}: {hint}")
    try:
        return Qwen2VLConfig.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(f"{what} config {source} could not be loaded ({str(error).splitlines()[0][:120]}): {hint}") from None


def build_backbone(config, state: dict, device: torch.device, dtype: torch.dtype, file: str) -> nn.Module:
    """``Qwen2VLModel`` (vision tower + language model, no LM head) with ``state`` loaded strictly.
    The vocabulary is the checkpoint's (the released models resized it for their special tokens)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    embed = state.get("language_model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{file} has no language_model embed_tokens: not a Qwen2-VL reward checkpoint")
    config.text_config.vocab_size = config.vocab_size = embed.shape[0]
    config._attn_implementation = "sdpa"
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    # every weight comes from the checkpoint: skip the random init (a minute for 7 B parameters on
    # a CPU) and allocate on the target device in the target dtype (one copy of the model there)
    with no_init_weights(), torch.device(device):
        model = Qwen2VLModel._from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        kind, keys = ("missing", result.missing_keys) if result.missing_keys else ("unexpected", result.unexpected_keys)
        raise ValueError(f"{file} does not match the Qwen2-VL config given by arch=: {kind} {keys[:3]}")
    model.eval().requires_grad_(False)
    return model


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """qwen_vl_utils' ``smart_resize``: the nearest size with sides divisible by ``factor`` and
    min_pixels <= h·w <= max_pixels, aspect ratio kept (HPSv3 pins h·w to 256·28·28)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Qwen2-VL reward heads take aspect ratios up to 200, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(pixels: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Normalised (N, C, H, W) images -> Qwen2-VL's flat patches (N·gh·gw, C·temporal·patch²), in the
    image processor's order: merge windows row by row, 2 x 2 patches inside each, every patch as
    channels x (the image repeated ``temporal`` times) x rows x columns. Pure torch: gradients flow."""
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, window row, window col, row in window, col in window, c, py, px
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


def reward_logits(backbone: nn.Module, head: nn.Module, batch: dict, token_ids: list[int]) -> torch.Tensor:
    """(B, len(token_ids), head outputs): ``head`` on the fp32 last hidden state at each special
    token, in prompt order. Images/videos are embedded by the vision tower and scattered into
    their placeholder tokens; positions are sequential (see the module docstring)."""
    input_ids = batch["input_ids"]
    embeds = backbone.get_input_embeddings()(input_ids)
    for pixels, grid, token in (("pixel_values", "image_grid_thw", backbone.config.image_token_id),
                                ("pixel_values_videos", "video_grid_thw", backbone.config.video_token_id)):
        if batch.get(pixels) is None:
            continue
        getter = backbone.get_image_features if pixels == "pixel_values" else backbone.get_video_features
        features = torch.cat(getter(batch[pixels], batch[grid]).pooler_output).to(embeds.dtype)
        mask = (input_ids == token).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
    selected = torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
    counts = selected.sum(dim=1)
    if not bool((counts == len(token_ids)).all()):
        raise ValueError(f"each prompt must hold the reward token(s) once each; found {counts.tolist()} of "
                         f"{len(token_ids)}: a prompt was truncated or contains a reward token itself")
    mask = batch.get("attention_mask")
    if mask is not None and right_padded(mask):
        # causal attention never lets a token see the pads after it, so with right padding the mask
        # changes no hidden state that is read; without it SDPA takes its fused causal kernel
        # (2.4x faster on a padded CPU batch, benchmarks/bench_vlm_reward.py)
        mask = None
    hidden = backbone.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # the head only where it is read: on every position it cost a third of a tiny model's forward
    return head(hidden[selected].float()).view(input_ids.shape[0], len(token_ids), -1)


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row of the attention mask is ones then zeros (padding only at the end)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def add_special_tokens(processor, tokens: list[str]) -> list[int]:
    """Add the reward tokens to the processor's tokenizer as the released models did; their ids."""
    processor.tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return processor.tokenizer.convert_tokens_to_ids(tokens)
