"""Sizes of the embedded tiny model, and the parts that are ours alone: the tiny CLIP's contrastive heads.

Budget (the issue: reproducible in 60 minutes on 2 CPU cores, file <= 25 MB): 64x64 pixels; a VAE that
downsamples 4x to 16x16x4 latents (8x would leave a small object one latent pixel wide); a UNet of 48 and 96
channels on two levels with cross-attention at the lower one; a CLIP text tower of width 128 and 4 layers. The
token table (49408 x 128) is most of the file: 12.6 MB in fp16, the rest about 6 MB. Every network that ships is
the project's own SD module (LDM key names), so the file loads like any SD 1.x checkpoint of family "tiny".
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..diffusion.unet import UNetConfig
from ..diffusion.vae import VAEConfig
from ..text.clip import CLIPTextConfig


@dataclass(frozen=True)
class ImageTowerConfig:
    """A small CNN for contrastive training of the tiny CLIP. It keeps a coarse spatial map (4x4 at 64 px) up to
    the projection instead of pooling it away, because the captions are about positions."""

    canvas: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)  # one stride-2 conv per entry: 64 -> 4 px
    projection_dim: int = 128


@dataclass(frozen=True)
class TinyModelConfig:
    text: CLIPTextConfig
    vae: VAEConfig
    unet: UNetConfig
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)

    @property
    def latent_size(self) -> int:
        return self.image.canvas // self.vae.downsample_factor


# The shipped model. quick_gelu and no text projection as in SD1's CLIP-L, so the tiny family loads and behaves
# like sd1 everywhere; the contrastive projections live in the training code (ContrastiveHeads).
TINY_SD = TinyModelConfig(
    text=CLIPTextConfig(width=128, layers=4, heads=4, max_positions=77),
    # The VAE's full-resolution level is what costs on a CPU: 16 channels there, 64 at 16x16. GroupNorm groups
    # of 2 channels (the SD modules default to 32 groups, too many for these widths).
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8),
    # Attention only at 8x8 (and the middle): self-attention over 256 tokens at 16x16 cost 2.3x the step time
    # (measured, 1 thread, batch 32) and 8x8 still resolves the 3x3 grid of positions.
    unet=UNetConfig(model_channels=48, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                    context_dim=128, num_heads=4, norm_groups=24),  # fmt: skip
)
# For tests of the training loop: seconds, not minutes; the vocabulary stays full so real token ids fit.
MICRO = TinyModelConfig(
    text=CLIPTextConfig(width=16, layers=2, heads=2, max_positions=77),
    vae=VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4),
    unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                    context_dim=16, num_heads=2, norm_groups=4),  # fmt: skip
    image=ImageTowerConfig(canvas=32, channels=(8, 16), projection_dim=16),
)
PRESETS = {"tiny-sd": TINY_SD, "micro": MICRO}


class ContrastiveHeads(nn.Module):
    """What CLIP training needs beyond the text tower: the image tower, the text projection (pooled EOS state ->
    shared space; not part of the SD checkpoint, whose CLIP-L has none) and the learned temperature."""

    def __init__(self, config: "TinyModelConfig"):
        super().__init__()
        self.image = ImageTower(config.image)
        self.text_projection = nn.Linear(config.text.width, config.image.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature


class CellReadout(nn.Module):
    """An auxiliary head for training the tiny CLIP: nine learned queries, one per cell of the 3x3 grid,
    cross-attend (``heads`` heads) over the text tower's final hidden states, the context a UNet sees, and name
    the colour, shape and size the caption puts in each cell (class 0: none). It asks the per-token states, which
    the contrastive loss trains only through what the EOS state gathers from them, to hold each object's
    attributes bound to its place, readable by cross-attention. Training only; not part of the checkpoint."""

    CLASSES = (7, 4, 3)  # colour (6 + none), shape (3 + none), size (small, large + unstated)

    def __init__(self, width: int, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(9, dim) / dim**0.5)
        self.key = nn.Linear(width, dim)
        self.value = nn.Linear(width, dim)
        self.out = nn.Linear(dim, sum(self.CLASSES))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden [B, T, D] -> logits per cell: ([B, 9, 7], [B, 9, 4], [B, 9, 3])."""
        b, t, _ = hidden.shape
        k = self.key(hidden).view(b, t, self.heads, -1).transpose(1, 2)  # [B, h, T, d]
        v = self.value(hidden).view(b, t, self.heads, -1).transpose(1, 2)
        q = self.queries.view(9, self.heads, -1).transpose(0, 1).expand(b, -1, -1, -1)  # [B, h, 9, d]
        read = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, h, 9, d]
        return self.out(read.transpose(1, 2).reshape(b, 9, -1)).split(self.CLASSES, dim=-1)


class ImageTower(nn.Module):
    """pixels [B, 3, H, W] in [-1, 1] -> embedding [B, P] (not normalised)."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for cout in config.channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU()]
            cin = cout
        self.convs = nn.Sequential(*layers)
        side = config.canvas // 2 ** len(config.channels)
        self.proj = nn.Linear(cin * side * side, config.projection_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.convs(pixels)  # [B, C, h, w]
        return self.proj(features.flatten(1))  # [B, C*h*w] -> [B, P]


def to_pixels(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1]."""
    import numpy as np

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # [B, 3, H, W]


def build_models(config: TinyModelConfig, tokenizer=None):
    """The networks of a training run (text tower, contrastive heads, VAE, UNet and its EMA copy) and the text
    encoder the UNet is conditioned through."""
    from ..diffusion.unet import UNetModel
    from ..diffusion.vae import AutoencoderKL
    from ..text.chunking import EOS_ID
    from ..text.clip import CLIPTextModel
    from ..text.conditioning import EncoderSpec, TextEncoder

    text = CLIPTextModel(config.text)
    models = {
        "text": text,
        "heads": ContrastiveHeads(config),
        "vae": AutoencoderKL(config.vae),
        "unet": UNetModel(config.unet),
    }
    models["ema"] = UNetModel(config.unet)
    models["ema"].load_state_dict(models["unet"].state_dict())
    models["ema"].requires_grad_(False)
    encoder = TextEncoder("tiny", [EncoderSpec("clip", text, EOS_ID, True, 1)], tokenizer)
    return models, encoder
