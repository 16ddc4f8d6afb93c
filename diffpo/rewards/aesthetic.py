"""The LAION improved aesthetic predictor: an MLP over normalised CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

import torch
from torch import nn

from diffpo.rewards.base import LearnedHead
from diffpo.rewards.open_clip_model import OpenClipEncoder, create_open_clip
from diffpo.rewards.weights import load_state_dict, resolve_checkpoint

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"  # a hub mirror of the GitHub release file
AESTHETIC_SOURCE = (f"github.com/christophschuhmann/improved-aesthetic-predictor (hub mirror {AESTHETIC_REPO})")


class AestheticMLP(nn.Module):
    """The predictor's layers; the state-dict keys are layers.0/2/4/6/7 as in the release file.
    No activations between the linears: that is the released model."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class Aesthetic(LearnedHead):
    """Predicted aesthetic rating (about 1-10) of each image; prompts are ignored.

    ``path``: the MLP checkpoint (a file, a folder holding it or a hub repo; default the file
    ``sac+logos+ava1-l14-linearMSE.pth``). ``clip_path``: the backbone's pretrained tag or local
    checkpoint (default ``openai``); ``arch`` overrides the backbone (default ViT-L-14). The MLP input
    size is read from the checkpoint. The MLP runs in float32 as the official code does (it is tiny);
    the backbone runs in ``dtype``.

    Evaluation path: open_clip's inference transform on 8-bit PIL images (the official code uses
    OpenAI ``clip``'s identical bicubic resize / centre crop / normalise). Differentiable path: the
    same in torch; on square images the two agree within 0.01 on the rating scale (measured max 2e-5
    on tiny random-weight models, whose MLP is nearly flat: a loose bound, not a tight one).
    """

    name = "aesthetic"

    def __init__(self, path: str | None = None, arch: str | None = None, clip_path: str | None = None, **common):
        super().__init__(**common)
        self.arch = arch or "ViT-L-14"
        if clip_path is None and arch is not None and not arch.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"aesthetic with arch={arch!r} needs clip_path= (a pretrained tag or a local checkpoint)")
        # the small MLP file first: a missing checkpoint fails before the backbone is built
        state = load_state_dict(resolve_checkpoint(path, AESTHETIC_FILE, AESTHETIC_REPO, AESTHETIC_SOURCE))
        backbone = create_open_clip(self.arch, clip_path if clip_path is not None or arch is not None else "openai")
        self.encoder = OpenClipEncoder(backbone, self.arch, self.device, self.dtype)
        if "layers.0.weight" not in state:
            raise ValueError(f"{AESTHETIC_FILE}: expected keys layers.0.weight ... layers.7.bias, found {list(state)[:4]}")
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state, strict=True)
        self.mlp = self.mlp.to(self.device).eval().requires_grad_(False)

    def _from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoder.encode_images(pixels)).squeeze(-1)

    def score_images(self, images, prompts):
        return self._from_pixels(self.encoder.official_pixels(images))

    def score_images_differentiable(self, images, prompts):
        return self._from_pixels(self.encoder.differentiable_pixels(images.to(self.device)))
