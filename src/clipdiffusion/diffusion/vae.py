"""The KL autoencoder (VAE) shared by SD 1.x, SD 2.x and SDXL: pixels [-1,1] <-> latents at 1/8 resolution.

Parameter names equal the LDM keys after `first_stage_model.` (Stability-AI/stablediffusion
`ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`); diffusers names go through
`checkpoints/diffusers_vae.py`. `decode` takes latents already divided by `scale_factor`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipDiffusionError
from ..values import is_int, positive_finite, show
from .attention import GroupNorm32

# Bounds far beyond every SD VAE (128 channels, 4 levels, 2 blocks), as for the UNet's config.
MAX_WIDTH = 1 << 20
MAX_BLOCKS = 256
MAX_LEVELS = 16


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_channels: int = 3
    # Latents are multiplied by this after encoding so they have roughly unit variance (measured on training
    # data by the model authors); the weights do not store it. SDXL's VAE was retrained and needs 0.13025.
    scale_factor: float = 0.18215
    norm_groups: int = 32

    def __post_init__(self):
        # Checked here because configs also come from files (our metadata, diffusers config.json): a bad value is
        # one error naming the field, never a crash inside torch or a silently black image (scale_factor NaN or 0).
        if not isinstance(self.ch_mult, (list, tuple)) or not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise ClipDiffusionError(f"VAEConfig.ch_mult={show(self.ch_mult)}: must be a list of 1 to {MAX_LEVELS} "
                                     f"integers, one per level")
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))  # JSON gives a list; keep configs hashable
        for name in ("ch", "z_channels", "embed_dim", "in_channels", "out_channels", "norm_groups"):
            value = getattr(self, name)
            if not is_int(value) or not 1 <= value <= MAX_WIDTH:
                raise ClipDiffusionError(f"VAEConfig.{name}={show(value)}: must be an integer from 1 to {MAX_WIDTH}")
        if not is_int(self.num_res_blocks) or not 1 <= self.num_res_blocks <= MAX_BLOCKS:
            raise ClipDiffusionError(f"VAEConfig.num_res_blocks={show(self.num_res_blocks)}: must be an integer "
                                     f"from 1 to {MAX_BLOCKS}")
        if not all(is_int(m) and 1 <= m <= MAX_WIDTH // self.ch for m in self.ch_mult):
            raise ClipDiffusionError(f"VAEConfig.ch_mult={show(self.ch_mult)}: must be positive integers (times "
                                     f"ch={self.ch}, at most {MAX_WIDTH})")
        if not positive_finite(self.scale_factor):
            raise ClipDiffusionError(f"VAEConfig.scale_factor={show(self.scale_factor)}: must be a finite number > 0")
        widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ClipDiffusionError(f"VAEConfig.norm_groups={self.norm_groups}: does not divide the {bad[0]} "
                                     f"channels of a level (ch={self.ch}, ch_mult={self.ch_mult})")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_weights(cls, sd, *, scale_factor: float = 0.18215, norm_groups: int = 32):
        """Read the config from a VAE state dict (LDM names, with or without `first_stage_model.`). The scale
        factor is not in the weights: pass the family's (0.18215 SD1/SD2, 0.13025 SDXL)."""
        prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in sd) else ""
        shape = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        if "encoder.conv_in.weight" not in shape or "decoder.conv_in.weight" not in shape:
            raise ClipDiffusionError("VAE weights: no encoder.conv_in.weight / decoder.conv_in.weight; "
                                     "not an LDM-layout VAE")
        ch, in_ch = shape["encoder.conv_in.weight"][:2]
        mults, level = [], 0
        while f"encoder.down.{level}.block.0.conv1.weight" in shape:
            mults.append(shape[f"encoder.down.{level}.block.0.conv1.weight"][0] // ch)
            level += 1
        n_res = 0
        while f"encoder.down.0.block.{n_res}.conv1.weight" in shape:
            n_res += 1
        return cls(ch=ch, ch_mult=tuple(mults), num_res_blocks=n_res, z_channels=shape["decoder.conv_in.weight"][1],
                   embed_dim=shape["post_quant_conv.weight"][0], in_channels=in_ch,
                   out_channels=shape["decoder.conv_out.weight"][0], scale_factor=scale_factor,
                   norm_groups=norm_groups)


SD1 = VAEConfig()
SD2 = SD1
SDXL = VAEConfig(scale_factor=0.13025)
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
PRESETS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "tiny": TINY}


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B,2Z,h,w] -> 2x [B,Z,h,w]
        self.logvar = logvar.clamp(-30.0, 20.0)  # LDM's clamp; keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Noise drawn in fp32 on the generator's device (CPU for the project's seeds), then moved: the same draw on
        # every device and dtype. A half-precision VAE's sample comes back in fp32.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        if self.mean.dtype in (torch.float16, torch.bfloat16):
            return self.mean.float() + self.std.float() * noise.to(self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self):
        return self.mean


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm32(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections (LDM `AttnBlock`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # [B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, as in LDM
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)  # [B,1,HW,C] -> [B,C,H,W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads right and bottom only (not the UNet's symmetric padding 1); the weights were trained so.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.N`) or decoder (`up.N`): resnet blocks, then an optional resample."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n_blocks))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks, g,
                  Downsample if i != last else None) for i in range(len(widths)))
        self.mid = Mid(widths[-1], g)
        self.norm_out = GroupNorm32(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean | logvar

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        # LDM stores `up` in resolution order (up.0 = full resolution) but runs it from the last level down.
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, g,
                  Upsample if i != 0 else None) for i in range(len(widths)))
        self.norm_out = GroupNorm32(g, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def _ramp(size: int, overlap: int, start: bool, end: bool, device):
    """1-D blend weights for a tile: rising over `overlap` at an edge shared with a neighbour, 1 elsewhere."""
    w = torch.ones(size, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if start:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if end:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _tile_starts(length: int, tile: int, overlap: int):
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]  # the last tile is aligned to the edge, so no tile is smaller than `tile`


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = SD1, *, dtype=None, device=None):
        super().__init__()
        self.config = config
        with torch.device(device or "cpu"):
            self.encoder = Encoder(config)
            self.decoder = Decoder(config)
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if dtype is not None:
            self.to(dtype)

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    def _layout(self, x, first_conv):
        x = x.to(self.dtype)
        if first_conv.weight.is_contiguous(memory_format=torch.channels_last):
            # The caller chose NHWC with model.to(memory_format=torch.channels_last); follow it.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, pixels) -> DiagonalGaussian:
        """pixels [B,3,H,W] in [-1,1], H and W multiples of 8 -> posterior over latents [B,4,H/8,W/8]
        (unscaled: multiply a sample by `config.scale_factor` before diffusion)."""
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1] != cfg.in_channels:
            raise ClipDiffusionError(f"VAE pixels: expected [B,{cfg.in_channels},H,W], got {list(pixels.shape)}")
        f = cfg.downsample_factor
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ClipDiffusionError(f"VAE pixels: height and width must be multiples of {f}, "
                                     f"got {pixels.shape[2]}x{pixels.shape[3]}")
        return DiagonalGaussian(self.quant_conv(self.encoder(self._layout(pixels, self.encoder.conv_in))))

    def _check_latents(self, latents):
        if latents.ndim != 4 or latents.shape[1] != self.config.embed_dim:
            raise ClipDiffusionError(f"VAE latents: expected [B,{self.config.embed_dim},h,w], "
                                     f"got {list(latents.shape)}")

    def decode(self, latents):
        """latents [B,4,h,w], already divided by scale_factor -> pixels [B,3,8h,8w], roughly in [-1,1]."""
        self._check_latents(latents)
        return self.decoder(self.post_quant_conv(self._layout(latents, self.decoder.conv_in)))

    def decode_tiled(self, latents, tile: int = 64, overlap: int = 16):
        """`decode` in overlapping latent tiles of `tile`x`tile`, blended linearly over `overlap` latent pixels,
        so memory is bounded by the tile size. Identical to `decode` when the latents fit one tile; otherwise
        close to it (each tile sees only its own GroupNorm statistics and attention context)."""
        self._check_latents(latents)
        if tile < 1 or not 0 <= overlap < tile:
            raise ClipDiffusionError(f"VAE decode_tiled: need tile >= 1 and 0 <= overlap < tile, "
                                     f"got tile={tile}, overlap={overlap}")
        b, _, h, w = latents.shape
        f = self.config.downsample_factor
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self.decode(latents)
        out = weight = None
        for y0 in ys:
            for x0 in xs:
                th, tw = min(tile, h), min(tile, w)
                pixels = self.decode(latents[:, :, y0:y0 + th, x0:x0 + tw]).float()
                if out is None:
                    out = torch.zeros(b, pixels.shape[1], h * f, w * f, device=pixels.device)
                    weight = torch.zeros(1, 1, h * f, w * f, device=pixels.device)
                wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h, pixels.device)
                wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w, pixels.device)
                mask = wy[:, None] * wx[None, :]  # [th*f, tw*f]
                out[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += pixels * mask
                weight[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += mask
        return (out / weight).to(self.dtype)
