"""ImageReward on a tiny random-weight checkpoint written with the official key names.

The key names and the shapes' roles come from THUDM/ImageReward: ``ImageReward.py`` (``blip`` +
``mlp``: ``MLP(768)`` = Linear/Dropout x3, Linear, Linear, saved as ``mlp.layers.{0,2,4,6,7}``),
``models/BLIP/blip_pretrain.py`` (``visual_encoder``, ``text_encoder``, ``vision_proj``,
``text_proj``), ``models/BLIP/vit.py`` (timm ViT: ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) and
``models/BLIP/med.py`` (BERT with ``crossattention`` in every layer). The file is a flat state
dict, as ``ImageReward.load`` reads it. The reference below is the official forward written out
with torch ops on those tensors (no diffpo and no transformers model code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffpo.rewards import REWARDS, load

WORDS = ["a", "red", "circle", "on", "blue", "background", "photo", "of", "cat", "dog", "mat", "the", "green", "square"]
PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a dog on a mat", "a green square"]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
V, VL, P, IMG, T, TL, MAXPOS = 128, 2, 8, 32, 128, 2, 40  # widths (2 heads of 64), layers, patch, image, positions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    vocab = 5 + len(WORDS) + 2  # + [DEC] and [ENC], as bert-base-uncased's 30522 + 2 = 30524
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, std=0.1), f"{prefix}.bias": rand(width, std=0.1)}

    def linear(prefix, out, inp, std=0.05):
        return {f"{prefix}.weight": rand(out, inp, std=std), f"{prefix}.bias": rand(out, std=0.02)}

    s = {"blip.visual_encoder.cls_token": rand(1, 1, V, std=0.5),
         "blip.visual_encoder.pos_embed": rand(1, (IMG // P) ** 2 + 1, V, std=0.5),
         "blip.visual_encoder.patch_embed.proj.weight": rand(V, 3, P, P, std=0.1),
         "blip.visual_encoder.patch_embed.proj.bias": rand(V, std=0.02)}
    for i in range(VL):
        b = f"blip.visual_encoder.blocks.{i}"
        s |= ln(f"{b}.norm1", V) | linear(f"{b}.attn.qkv", 3 * V, V, 0.1) | linear(f"{b}.attn.proj", V, V)
        s |= ln(f"{b}.norm2", V) | linear(f"{b}.mlp.fc1", 4 * V, V, 0.1) | linear(f"{b}.mlp.fc2", V, 4 * V)
    s |= ln("blip.visual_encoder.norm", V)
    s |= {"blip.text_encoder.embeddings.position_ids": torch.arange(MAXPOS).expand(1, -1),
          "blip.text_encoder.embeddings.word_embeddings.weight": rand(vocab, T, std=0.5),
          "blip.text_encoder.embeddings.position_embeddings.weight": rand(MAXPOS, T, std=0.5)}
    s |= ln("blip.text_encoder.embeddings.LayerNorm", T)
    for i in range(TL):
        b = f"blip.text_encoder.encoder.layer.{i}"
        for att, kv in (("attention", T), ("crossattention", V)):
            s |= linear(f"{b}.{att}.self.query", T, T, 0.1) | linear(f"{b}.{att}.self.key", T, kv, 0.1)
            s |= linear(f"{b}.{att}.self.value", T, kv) | linear(f"{b}.{att}.output.dense", T, T)
            s |= ln(f"{b}.{att}.output.LayerNorm", T)
        s |= linear(f"{b}.intermediate.dense", 4 * T, T, 0.1) | linear(f"{b}.output.dense", T, 4 * T) | ln(f"{b}.output.LayerNorm", T)
    s |= linear("blip.vision_proj", 256, V) | linear("blip.text_proj", 256, T)
    for index, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, T), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s |= linear(f"mlp.layers.{index}", out, inp, std=1.0 / inp ** 0.5)
    torch.save(s, root / "ImageReward.pt")
    return root


def kwargs(root, **extra):
    return dict(path=str(root), tokenizer_path=str(root / "tokenizer"), **extra)


def reference_pixels(images, size=IMG):
    """ImageReward's _transform by hand: PIL bicubic shortest side -> size, centre crop, /255, CLIP mean/std."""
    out = []
    for array in (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
        im = Image.fromarray(array)
        w, h = im.size
        short = min(w, h)
        im = im.resize((size * w // short, size * h // short), Image.BICUBIC)
        left, top = round((im.size[0] - size) / 2), round((im.size[1] - size) / 2)
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(((np.asarray(im, dtype=np.float64) / 255 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out)


def reference_scores(s, pixels, prompts, tokenizer_dir):
    from transformers import BertTokenizer

    def layer_norm(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"], eps)

    def lin(x, p):
        return x @ s[f"{p}.weight"].T + s[f"{p}.bias"]

    def attend(q, k, v, heads, mask=None):
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        if mask is not None:
            logits = logits + (1.0 - mask[:, None, None, :]) * -1e9
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    # vision: BLIP's VisionTransformer.forward
    ve = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{ve}.patch_embed.proj.weight"], s[f"{ve}.patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([s[f"{ve}.cls_token"].expand(x.shape[0], -1, -1), x], 1) + s[f"{ve}.pos_embed"]
    for i in range(VL):
        b = f"{ve}.blocks.{i}"
        q, k, v = lin(layer_norm(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, v, V // 64), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(layer_norm(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = layer_norm(x, f"{ve}.norm", 1e-6)
    # text: med.py BertModel in multimodal mode, [CLS] kept (ImageReward does not swap in [ENC])
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    mask = tokens["attention_mask"].float()
    te = "blip.text_encoder"
    y = s[f"{te}.embeddings.word_embeddings.weight"][tokens["input_ids"]] + s[f"{te}.embeddings.position_embeddings.weight"][:35]
    y = layer_norm(y, f"{te}.embeddings.LayerNorm", 1e-12)
    for i in range(TL):
        b = f"{te}.encoder.layer.{i}"
        a = attend(lin(y, f"{b}.attention.self.query"), lin(y, f"{b}.attention.self.key"), lin(y, f"{b}.attention.self.value"), T // 64, mask)
        y = layer_norm(lin(a, f"{b}.attention.output.dense") + y, f"{b}.attention.output.LayerNorm", 1e-12)
        c = attend(lin(y, f"{b}.crossattention.self.query"), lin(image, f"{b}.crossattention.self.key"),
                   lin(image, f"{b}.crossattention.self.value"), T // 64)
        y = layer_norm(lin(c, f"{b}.crossattention.output.dense") + y, f"{b}.crossattention.output.LayerNorm", 1e-12)
        y = layer_norm(lin(F.gelu(lin(y, f"{b}.intermediate.dense")), f"{b}.output.dense") + y, f"{b}.output.LayerNorm", 1e-12)
    z = y[:, 0]
    for index in (0, 2, 4, 6, 7):  # dropout is the identity in eval; no activations
        z = lin(z, f"mlp.layers.{index}")
    return z[:, 0]


def smooth_images(n, height=48, width=48, seed=0):
    noise = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)


def test_imagereward_equals_the_official_forward_written_out(checkpoint):
    state = torch.load(checkpoint / "ImageReward.pt", weights_only=True)
    for shape in ((48, 48), (40, 64)):  # square and wide: shortest side resize + centre crop
        images = smooth_images(4, *shape)
        raw = reference_scores(state, reference_pixels(images), PROMPTS, checkpoint / "tokenizer")
        head = load("imagereward", **kwargs(checkpoint))
        assert torch.allclose(head(images, PROMPTS), (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-4)
        assert torch.allclose(load("imagereward", raw=True, **kwargs(checkpoint))(images, PROMPTS), raw, atol=1e-4)
    assert raw.std() > 0.05  # the prompts and images matter, so the check above has teeth


def test_imagereward_batch_size_invariance_and_gradients(checkpoint):
    images = smooth_images(5, seed=1)
    prompts = PROMPTS + ["the cat"]
    one = load("imagereward", batch_size=1, **kwargs(checkpoint))(images, prompts)
    three = load("imagereward", batch_size=3, **kwargs(checkpoint))
    assert one.shape == (5,) and torch.allclose(one, three(images, prompts), atol=1e-5)
    pixels = images.clone().requires_grad_(True)
    differentiable = three.score_differentiable(pixels, prompts)
    differentiable.sum().backward()
    assert pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    assert (differentiable.detach() - one).abs().max() < 0.05  # torch vs PIL bicubic and 8-bit rounding


def test_imagereward_bad_checkpoints_and_missing_files(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt not found at .*THUDM/ImageReward or pass path="):
        load("imagereward", path=str(tmp_path), tokenizer_path=str(checkpoint / "tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt .*THUDM/ImageReward"):  # HF_HUB_OFFLINE=1
        load("imagereward", tokenizer_path=str(checkpoint / "tokenizer"))
    state = torch.load(checkpoint / "ImageReward.pt", weights_only=True)
    torch.save({**state, "blip.itm_head.weight": torch.zeros(2, 2)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"not an ImageReward checkpoint: unexpected keys \['blip.itm_head.weight'\]"):
        load("imagereward", path=str(tmp_path / "extra.pt"), tokenizer_path=str(checkpoint / "tokenizer"))
    torch.save({k: v for k, v in state.items() if not k.endswith("blocks.1.norm2.bias")}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"does not match ImageReward's vision tower: missing \['encoder.layers.1.layer_norm2.bias'\]"):
        load("imagereward", path=str(tmp_path / "short.pt"), tokenizer_path=str(checkpoint / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="BERT tokenizer not found at"):
        load("imagereward", path=str(checkpoint), tokenizer_path=str(tmp_path / "nowhere"))
    assert "imagereward" in REWARDS
