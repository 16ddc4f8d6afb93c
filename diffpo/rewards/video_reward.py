"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback",
arXiv 2501.13918): Qwen2-VL-2B with a linear reward head read at three special tokens, one per
dimension: visual quality (VQ), motion quality (MQ) and text alignment (TA).

The release (KwaiVGI/VideoReward) is a folder: ``model_config.json`` (data, model, LoRA and
inference settings) and ``checkpoint-<step>/`` holding either ``model.pth`` (every weight) or
``adapter_model.safetensors`` (LoRA) + ``non_lora_state_dict.pth`` (the reward head, the resized
embeddings and anything else trained in full) on top of the base model (Qwen/Qwen2-VL-2B-Instruct).
``load_release`` reads both layouts; LoRA is merged into the base weights (W + s·B·A with
s = α/r, or α/√r for rsLoRA, as peft computes it).
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from torch import nn

from diffpo.resources import package_path
from diffpo.rewards.base import LearnedHead
from diffpo.rewards.qwen2vl_reward import (add_special_tokens, build_backbone, canonical_key, load_config,
                                           reward_logits, smart_resize, split_checkpoint)
from diffpo.rewards.weights import load_state_dict, looks_like_hub_id

VIDEOREWARD_REPO = "KwaiVGI/VideoReward"
DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
VIDEO_MIN_PIXELS = 128 * 28 * 28  # VideoAlign's vision_process.py: the smallest frame it resizes to
FRAME_FACTOR = 2  # frames come in pairs (Qwen2-VL's temporal patch)


def release_prompt(prompt: str) -> str:
    """The released ``detailed_special`` template (prompt_template.py) with the caption filled in."""
    template = (package_path("rewards", "prompts") / "videoreward_detailed_special.txt").read_text()
    return template.format(text_prompt=prompt)


def _missing(what: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {where}: download the {VIDEOREWARD_REPO} folder from the hub "
                             "(model_config.json and checkpoint-*/) and pass path= that folder")


def resolve_release(path: str | None) -> str:
    """The local release folder: ``path`` itself, or the hub snapshot of ``path`` (default KwaiVGI/VideoReward)."""
    if path is not None and os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_config.json")):
            raise _missing("model_config.json", path)
        return path
    if path is not None and not looks_like_hub_id(path):
        raise _missing("the VideoReward folder", path)
    repo = path or VIDEOREWARD_REPO
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo)
    except Exception as error:  # offline or missing: the user fetches the folder
        raise FileNotFoundError(f"the VideoReward folder is not in the hub cache and not downloadable from {repo} "
                                f"({error.__class__.__name__}): download it or pass path= a local copy") from None


def _step(folder: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", folder.rstrip("/"))
    return int(match.group(1)) if match else -1


def merge_lora(base: dict, adapter: dict, scale: float) -> dict:
    """``base`` (canonical names, see ``canonical_key``) with every LoRA pair of peft's
    ``adapter_model.safetensors`` merged in: W + scale · B · A, computed in fp32."""
    merged = dict(base)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0]
        target = canonical_key(module + ".weight")
        if target not in merged:
            raise ValueError(f"LoRA weight {key} targets {target}, which the base model does not have")
        weight = merged[target]
        merged[target] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return merged


def read_safetensors_folder(folder: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors at {folder}: pass base_path= a folder of Qwen/Qwen2-VL-2B-Instruct")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_release(folder: str, base_path: str | None, step: int | None = None) -> tuple[dict, dict, dict]:
    """(settings from model_config.json, backbone state, rm_head state) of a release folder."""
    with open(os.path.join(folder, "model_config.json")) as handle:
        settings = json.load(handle)
    checkpoints = sorted(glob.glob(os.path.join(folder, "checkpoint-*")), key=_step, reverse=True)
    if step is not None:
        checkpoints = [c for c in checkpoints if _step(c) == step]
    if not checkpoints:
        raise _missing(f"checkpoint-{step if step is not None else '*'}/", folder)
    checkpoint = checkpoints[0]
    full = os.path.join(checkpoint, "model.pth")
    if os.path.isfile(full):
        state = load_state_dict(full)
    else:
        adapter_file = os.path.join(checkpoint, "adapter_model.safetensors")
        non_lora_file = os.path.join(checkpoint, "non_lora_state_dict.pth")
        for file in (adapter_file, non_lora_file):
            if not os.path.isfile(file):
                raise _missing(f"{os.path.basename(file)} (or model.pth)", checkpoint)
        from safetensors.torch import load_file

        lora = settings.get("peft_lora_config", {})
        r, alpha = lora.get("lora_r", 16), lora.get("lora_alpha", 32)
        scale = alpha / (r ** 0.5) if lora.get("use_rslora") else alpha / r
        base_source = base_path or settings["model_config"]["model_name_or_path"]
        if not os.path.isdir(base_source):
            if not looks_like_hub_id(base_source):
                raise FileNotFoundError(f"base model not found at {base_source}: pass base_path= a folder of Qwen/Qwen2-VL-2B-Instruct")
            try:
                from huggingface_hub import snapshot_download

                base_source = snapshot_download(base_source, allow_patterns=["*.safetensors", "*.json"])
            except Exception as error:
                raise FileNotFoundError(f"base model {base_source} is not in the hub cache and not downloadable "
                                        f"({error.__class__.__name__}): pass base_path= a local copy") from None
        base = canonical_state(read_safetensors_folder(base_source))
        base.update(canonical_state(load_state_dict(non_lora_file)))
        state = merge_lora(base, load_file(adapter_file), scale)
    backbone, head = split_checkpoint(state)
    return settings, backbone, head


def canonical_state(state: dict) -> dict:
    return {name: value for key, value in state.items() if (name := canonical_key(key)) is not None}


class VideoReward(LearnedHead):
    """VideoReward's scores of (B, F, 3, H, W) videos: ``output="overall"`` (default) is VQ + MQ + TA,
    ``"VQ"``, ``"MQ"`` or ``"TA"`` one dimension; each is standardised with the release's
    ``inference_config`` means/stds (``normalize=False``: the raw head outputs), as
    ``VideoVLMRewardInference.reward(use_norm=True)`` does. ``scores(videos, prompts)`` returns all four.

    ``path``: the release folder (model_config.json + checkpoint-*/) or a hub repo (default
    KwaiVGI/VideoReward); ``checkpoint_step`` picks a checkpoint (default the latest).
    ``base_path``: the base model's weights for a LoRA release (default the model_config's
    model_name_or_path, Qwen/Qwen2-VL-2B-Instruct). ``arch``: its config (default the same);
    ``processor_path``: its processor (default the same). ``num_frames``: frames sampled uniformly
    (linspace, rounded, as the release's reader; default every frame given, an even count);
    ``max_pixels``: pixels per frame (default the release's ``max_frame_pixels``).

    Preprocessing (the release's ``fetch_video`` on a frame tensor): 0-255 float frames resized with
    torchvision's antialiased bicubic to the 28-divisible size within [128·28·28, max_pixels] pixels
    nearest the aspect ratio, then the processor's video path (rescale, normalise, 2-frame patches).
    """

    name = "video-reward"
    differentiable = False
    scores_videos = True

    def __init__(self, path: str | None = None, arch: str | None = None, processor_path: str | None = None,
                 base_path: str | None = None, output: str = "overall", normalize: bool = True,
                 num_frames: int | None = None, max_pixels: int | None = None, min_pixels: int = VIDEO_MIN_PIXELS,
                 checkpoint_step: int | None = None, **common):
        from transformers import AutoProcessor

        from diffpo.rewards.pickscore import _from_pretrained

        super().__init__(**common)
        if output not in ("overall", *DIMENSIONS):
            raise ValueError(f"video-reward: output={output!r} is unknown; use 'overall', 'VQ', 'MQ' or 'TA'")
        if num_frames is not None and num_frames < FRAME_FACTOR:
            raise ValueError(f"video-reward: num_frames={num_frames} must be >= 2 (frames go in pairs)")
        folder = resolve_release(path)
        settings, backbone_state, head_state = load_release(folder, base_path, checkpoint_step)
        data, model_settings = settings.get("data_config", {}), settings.get("model_config", {})
        if data.get("prompt_template_type", "detailed_special") != "detailed_special" or not model_settings.get("use_special_tokens", True):
            raise ValueError(f"{folder}: diffpo reads the released VideoReward layout (prompt_template_type "
                             "'detailed_special' with special tokens); this model_config.json uses another")
        base = model_settings.get("model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct")
        self.output, self.normalize, self.num_frames = output, normalize, num_frames
        self.max_pixels = max_pixels or data.get("max_frame_pixels", 448 * 448)
        self.min_pixels = min_pixels
        self.stats = settings.get("inference_config") or {}
        if normalize and not self.stats:
            raise ValueError(f"{folder}/model_config.json has no inference_config (VQ_mean, ...): pass normalize=False")
        config = load_config(arch or base, "Qwen2-VL", base)
        self.processor = _from_pretrained(AutoProcessor, processor_path or base, "Qwen2-VL processor", base, "processor_path")
        self.processor.tokenizer.padding_side = "right"
        self.token_ids = add_special_tokens(self.processor, REWARD_TOKENS)
        self.backbone = build_backbone(config, backbone_state, self.device, self.dtype, folder)
        if set(head_state) != {"weight"}:
            raise ValueError(f"{folder}: expected VideoReward's linear rm_head (rm_head.weight), found {sorted(head_state)[:3]}")
        self.head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0], bias=False)
        self.head.load_state_dict(head_state)
        self.head = self.head.float().to(self.device).eval().requires_grad_(False)

    def frames(self, video: torch.Tensor) -> torch.Tensor:
        """(T, 3, h, w) 0-255 float frames: uniform sampling and the release's resize."""
        import torchvision.transforms.functional as TF

        total = video.shape[0]
        count = self.num_frames if self.num_frames is not None else total
        count = min(round(count / FRAME_FACTOR) * FRAME_FACTOR, total - total % FRAME_FACTOR)
        if count < FRAME_FACTOR:
            raise ValueError(f"video-reward needs at least 2 frames per video, got {total}")
        index = torch.linspace(0, total - 1, count).round().long()
        frames = (video[index].clamp(0, 1) * 255).round()  # 8-bit, as decoded video frames are
        height, width = smart_resize(*frames.shape[-2:], self.min_pixels, self.max_pixels)
        return TF.resize(frames, [height, width], TF.InterpolationMode.BICUBIC, antialias=True).float()

    def inputs(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        messages = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": release_prompt(p)}]}]
                    for p in prompts]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        batch = self.processor(text=texts, videos=[self.frames(v) for v in videos], padding=True, return_tensors="pt",
                               videos_kwargs={"do_rescale": True})
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def scores(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{"VQ", "MQ", "TA", "overall"}`` -> (B,) float32 for (B, F, 3, H, W) videos in [0, 1]."""
        from diffpo.rewards.base import check_images

        videos = check_images(videos, list(prompts))
        if videos.ndim != 5:
            raise ValueError(f"video-reward scores videos (B, F, 3, H, W), got images {tuple(videos.shape)}")
        size = self.batch_size or len(prompts)
        parts = [self._dimensions(videos[i : i + size], list(prompts)[i : i + size]) for i in range(0, len(prompts), size)]
        return {k: torch.cat([p[k] for p in parts]).float().cpu() for k in (*DIMENSIONS, "overall")}

    @torch.no_grad()
    def _dimensions(self, videos, prompts) -> dict[str, torch.Tensor]:
        batch = self.inputs(videos, prompts)
        if "pixel_values_videos" in batch:
            batch["pixel_values_videos"] = batch["pixel_values_videos"].to(self.dtype)
        logits = reward_logits(self.backbone, self.head, batch, self.token_ids)  # (B, 3 tokens, 3 outputs)
        # output_dim 3: the k-th token's k-th output is dimension k (the release's diagonal)
        values = logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == len(DIMENSIONS) else logits[..., 0]
        out = {}
        for k, name in enumerate(DIMENSIONS):
            value = values[:, k]
            if self.normalize:
                value = (value - self.stats[f"{name}_mean"]) / self.stats[f"{name}_std"]
            out[name] = value
        out["overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out

    def score_images(self, images, prompts):
        return self._dimensions(images, prompts)[self.output]
