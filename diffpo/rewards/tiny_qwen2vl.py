"""Tiny random-weight Qwen2-VL reward checkpoints in the released file formats, and an offline
Qwen2-VL processor, for tests and benchmarks (no hub access).

The processor has a byte-level tokenizer (256 byte tokens, no merges) with Qwen2-VL's special
tokens and Qwen2-VL-Instruct's chat template, so prompts are laid out exactly as with the real
processor; only the token ids differ. Checkpoints use the names a transformers 4.4x
``Qwen2VLForConditionalGeneration`` subclass saves (``model.layers.*``, ``visual.*``,
``lm_head.weight``, ``rm_head.*``), which is how HPSv3.safetensors and VideoAlign's checkpoints
were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MIN_PIXELS = 4 * 28 * 28
SPECIAL_TOKENS = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B/2B-Instruct's chat template (chat_template.json of the hub repos)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_processor(folder: str | Path, max_pixels: int = 64 * 28 * 28) -> Path:
    """A Qwen2VLProcessor saved to ``folder``: byte-level tokenizer, the Instruct chat template,
    image and video processors with Qwen2-VL's defaults except ``max_pixels``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from diffpo.models.tokenizer import bytes_to_unicode
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(bytes_to_unicode())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                  "additional_special_tokens": SPECIAL_TOKENS})
    # min_pixels 4 x 28 x 28 (Qwen2-VL's image default; the video default is 128 x 28 x 28) so tiny frames stay tiny
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=max_pixels),
                                 video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=max_pixels),
                                 tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return Path(folder)


def tiny_config(processor_folder: str | Path, extra_tokens: int, hidden: int = 64, layers: int = 2):
    """A Qwen2VLConfig whose special-token ids are the tiny processor's; ``extra_tokens`` reward
    tokens are counted into the vocabulary (the release resized its embeddings the same way)."""
    from transformers import AutoTokenizer, Qwen2VLConfig

    tokenizer = AutoTokenizer.from_pretrained(processor_folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + extra_tokens, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rms_norm_eps=1e-6),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=hidden, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def official_state_dict(config, rm_head: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random backbone weights under transformers 4.4x's names plus ``rm_head.*``."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    torch.manual_seed(seed)
    backbone = Qwen2VLModel(config).eval()
    state = {}
    for key, value in backbone.state_dict().items():
        # 5.x Qwen2VLModel names -> 4.4x Qwen2VLForConditionalGeneration names
        key = "model." + key.removeprefix("language_model.") if key.startswith("language_model.") else key
        # transformers' init leaves LayerNorm/RMSNorm at 1/0: perturb them so a mix-up shows
        state[key] = value + 0.05 * torch.randn_like(value) if value.ndim == 1 else value.clone()
    state["lm_head.weight"] = torch.randn(config.text_config.vocab_size, config.text_config.hidden_size) * 0.02
    state.update({f"rm_head.{k}": v for k, v in rm_head.items()})
    return state


def save_tiny_hps_v3(folder: str | Path, seed: int = 0) -> Path:
    """``folder``/processor (the tiny processor), ``folder``/config.json and ``folder``/HPSv3.safetensors
    with the released head layout (rm_head.0/3/5: hidden -> 1024 -> 16 -> 2)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = save_tiny_processor(folder / "processor")
    config = tiny_config(processor, extra_tokens=1)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = config.text_config.hidden_size
    head = {"0.weight": torch.randn(1024, hidden, generator=g) / hidden ** 0.5, "0.bias": torch.randn(1024, generator=g) * 0.1,
            "3.weight": torch.randn(16, 1024, generator=g) / 32, "3.bias": torch.randn(16, generator=g) * 0.1,
            "5.weight": torch.randn(2, 16, generator=g) * 5, "5.bias": torch.randn(2, generator=g) * 0.1}
    # the last layer is large so that images and prompts move the tiny model's scores by far more than float error
    save_file({k: v.contiguous() for k, v in official_state_dict(config, head, seed).items()}, folder / "HPSv3.safetensors")
    return folder


def save_tiny_video_reward(folder: str | Path, lora: bool = True, seed: int = 0) -> Path:
    """A VideoReward release folder in the layout of KwaiVGI/VideoReward: ``model_config.json`` and
    ``checkpoint-10/`` with ``adapter_model.safetensors`` (peft's LoRA names, r=4, alpha=8, on the
    language model's q/v projections) + ``non_lora_state_dict.pth`` (rm_head, the resized embeddings,
    the vision merger) over the base model in ``folder``/base (``lora=True``), or one ``model.pth``
    with every weight (``lora=False``). Also ``folder``/processor, and ``folder``/config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "checkpoint-10").mkdir(parents=True, exist_ok=True)
    processor = save_tiny_processor(folder / "processor")
    config = tiny_config(processor, extra_tokens=3)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed + 2)
    hidden = config.text_config.hidden_size
    state = official_state_dict(config, {"weight": torch.randn(3, hidden, generator=g) / hidden ** 0.5}, seed)
    inference = {"VQ_mean": 0.3, "VQ_std": 1.5, "MQ_mean": -0.2, "MQ_std": 0.8, "TA_mean": 0.1, "TA_std": 2.0}
    settings = {"data_config": {"max_frame_pixels": MIN_PIXELS, "num_frames": None, "fps": 2.0, "sample_type": "uniform",
                                "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                                "meta_data": "unused.csv", "data_dir": "unused"},
                "model_config": {"model_name_or_path": str(folder / "base"), "output_dim": 3, "use_special_tokens": True,
                                 "reward_token": "special", "torch_dtype": "bfloat16"},
                "peft_lora_config": {"lora_enable": lora, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
                "inference_config": inference}
    (folder / "model_config.json").write_text(json.dumps(settings, indent=2))
    if not lora:
        torch.save(state, folder / "checkpoint-10" / "model.pth")
        return folder
    # the base model before training: no reward tokens yet, Qwen2-VL's padded vocabulary (5 spare rows)
    base = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
    embed = state["model.embed_tokens.weight"]
    base["model.embed_tokens.weight"] = torch.cat([embed[:-3], torch.randn(5, hidden, generator=g)])
    base["lm_head.weight"] = torch.randn(embed.shape[0] + 2, hidden, generator=g) * 0.02
    trained = {"rm_head.weight", "model.embed_tokens.weight"} | {k for k in state if k.startswith("visual.merger.")}
    for key in trained - {"rm_head.weight", "model.embed_tokens.weight"}:
        base[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=g)  # the merger moved in training
    (folder / "base").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, folder / "base" / "model.safetensors")
    config.save_pretrained(folder / "base")
    torch.save({f"base_model.model.{k}": state[k] for k in trained}, folder / "checkpoint-10" / "non_lora_state_dict.pth")
    adapter = {}
    for layer in range(config.text_config.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            weight = state[f"model.layers.{layer}.self_attn.{proj}.weight"]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.1
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.1
    save_file(adapter, folder / "checkpoint-10" / "adapter_model.safetensors")
    return folder
