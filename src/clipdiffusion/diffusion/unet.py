"""The Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL) with cross-attention to the text context.

Parameter names equal the LDM/SGM single-file keys after `model.diffusion_model.` (construction rule and key
tables in Stability-AI/stablediffusion `ldm/modules/diffusionmodules/openaimodel.py`), so loading a single-file
checkpoint is a dict copy; diffusers' names go through `checkpoints/diffusers_unet.py`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipDiffusionError
from ..values import is_int, show
from .attention import CrossAttention, GroupNorm32, SpatialTransformer


# Bounds far beyond every Stable Diffusion model (SDXL: 2048-wide context, 1280 channels, depth 10, 3 levels) that
# keep a hostile config from building millions of modules or overflowing a shape product.
MAX_WIDTH = 1 << 20
MAX_BLOCKS = 256
MAX_LEVELS = 16


def _check_int(name, value, *, maximum=MAX_WIDTH, none=False):
    if none and value is None:
        return
    if not is_int(value) or not 1 <= value <= maximum:
        allowed = "None or " if none else ""
        raise ClipDiffusionError(f"UNetConfig.{name}={show(value)}: must be {allowed}an integer from 1 to {maximum}")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer depth per level, 0 = no attention at that level. This folds LDM's `attention_resolutions`
    # (downsample factors) and `transformer_depth` into one field that the weights reveal directly: SD1/SD2 attend
    # at ds 1,2,4 -> (1,1,1,0); SDXL attends at ds 2,4 only, depth [1,2,10] -> (0,2,10).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    # Exactly one of these is set: SD1 fixes the head count (head width grows with the level), SD2/SDXL fix the
    # head width at 64. The weights cannot tell the two apart, so `from_weights` takes them from the family.
    num_heads: int | None = 8
    head_channels: int | None = None
    use_linear_in_transformer: bool = False  # SD2/SDXL: proj_in/proj_out are Linear, not 1x1 conv
    adm_in_channels: int | None = None  # SDXL: width of the vector y (pooled text + size embeddings), `label_emb`
    # SDXL: sinusoidal width of each size/crop scalar inside y (diffusers `addition_time_embed_dim`)
    size_embed_dim: int = 256
    norm_groups: int = 32

    def __post_init__(self):
        # Configs come from files (our metadata, diffusers config.json) as well as from code: every value is
        # checked here, so that a hostile or broken value is one error naming the field, never a crash deep inside
        # torch (a negative width, a GroupNorm that does not divide, a list where an int belongs).
        for name in ("channel_mult", "transformer_depth"):  # JSON round trips give lists; keep configs hashable
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS:
                raise ClipDiffusionError(f"UNetConfig.{name}={show(value)}: must be a list of 1 to {MAX_LEVELS} "
                                         f"integers, one per level")
            object.__setattr__(self, name, tuple(value))
        for name in ("in_channels", "out_channels", "model_channels", "context_dim", "size_embed_dim", "norm_groups"):
            _check_int(name, getattr(self, name))
        for name in ("num_res_blocks", "transformer_depth_middle"):
            _check_int(name, getattr(self, name), maximum=MAX_BLOCKS)
        for name in ("adm_in_channels", "num_heads", "head_channels"):
            _check_int(name, getattr(self, name), none=True)
        if not isinstance(self.use_linear_in_transformer, bool):
            raise ClipDiffusionError(f"UNetConfig.use_linear_in_transformer={show(self.use_linear_in_transformer)}: "
                                     f"must be true or false")
        for mult in self.channel_mult:
            if not is_int(mult) or not 1 <= mult <= MAX_WIDTH // self.model_channels:
                raise ClipDiffusionError(f"UNetConfig.channel_mult={show(self.channel_mult)}: must be positive "
                                         f"integers (times model_channels={self.model_channels}, at most {MAX_WIDTH})")
        if not all(is_int(d) and 0 <= d <= MAX_BLOCKS for d in self.transformer_depth):
            raise ClipDiffusionError(f"UNetConfig.transformer_depth={show(self.transformer_depth)}: must be integers "
                                     f"from 0 (no attention) to {MAX_BLOCKS}")
        if (self.num_heads is None) == (self.head_channels is None):
            raise ClipDiffusionError(
                f"UNetConfig: set exactly one of num_heads ({self.num_heads}) and head_channels ({self.head_channels})")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ClipDiffusionError(f"UNetConfig.transformer_depth {self.transformer_depth} needs one entry per "
                                     f"level of channel_mult {self.channel_mult}")
        widths = [self.model_channels] + [m * self.model_channels for m in self.channel_mult]
        bad = sorted({w for w in widths if w % self.norm_groups})
        if bad:
            raise ClipDiffusionError(f"UNetConfig.norm_groups={self.norm_groups}: does not divide the {bad[0]} "
                                     f"channels of a level (model_channels={self.model_channels}, "
                                     f"channel_mult={self.channel_mult})")
        split = self.num_heads or self.head_channels
        for mult, depth in zip(self.channel_mult, self.transformer_depth):
            if (depth or mult == self.channel_mult[-1]) and (mult * self.model_channels) % split:
                field = "num_heads" if self.num_heads else "head_channels"
                raise ClipDiffusionError(f"UNetConfig.{field}={split} does not divide the "
                                         f"{mult * self.model_channels} channels of an attention level")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a SpatialTransformer with `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_channels, self.head_channels

    @classmethod
    def from_weights(cls, sd, *, num_heads=None, head_channels=None, size_embed_dim=256, norm_groups=32):
        """Read the config from a UNet state dict (LDM names, with or without `model.diffusion_model.`).

        Shapes give everything except the head split: pass `num_heads` or `head_channels`, or get the family
        default (conv projections = SD1 = 8 heads; linear = SD2/SDXL = 64-wide heads).
        """
        prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in sd) else ""
        shape = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        if "input_blocks.0.0.weight" not in shape:
            raise ClipDiffusionError("UNet weights: no input_blocks.0.0.weight; not an LDM-layout UNet")
        mc, in_ch = shape["input_blocks.0.0.weight"][:2]
        mults, depths, n_res, level, res_in_level = [], [], None, 0, 0
        context_dim, linear, i = None, False, 1
        while f"input_blocks.{i}.0.op.weight" in shape or f"input_blocks.{i}.0.in_layers.0.weight" in shape:
            if f"input_blocks.{i}.0.op.weight" in shape:
                n_res, level, res_in_level = res_in_level, level + 1, 0
            else:
                if res_in_level == 0:
                    mults.append(shape[f"input_blocks.{i}.0.out_layers.3.weight"][0] // mc)
                    depths.append(_count_blocks(shape, f"input_blocks.{i}.1.transformer_blocks."))
                res_in_level += 1
                to_k = shape.get(f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight")
                if to_k is not None:
                    context_dim = to_k[1]
                    linear = len(shape[f"input_blocks.{i}.1.proj_in.weight"]) == 2
            i += 1
        middle_depth = _count_blocks(shape, "middle_block.1.transformer_blocks.")
        if context_dim is None:
            context_dim = shape["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shape["middle_block.1.proj_in.weight"]) == 2
        if num_heads is None and head_channels is None:
            num_heads, head_channels = (None, 64) if linear else (8, None)
        adm = shape["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shape else None
        return cls(in_channels=in_ch, out_channels=shape["out.2.weight"][0], model_channels=mc,
                   channel_mult=tuple(mults), num_res_blocks=n_res if n_res is not None else res_in_level,
                   transformer_depth=tuple(depths), transformer_depth_middle=middle_depth, context_dim=context_dim,
                   num_heads=num_heads, head_channels=head_channels, use_linear_in_transformer=linear,
                   adm_in_channels=adm, size_embed_dim=size_embed_dim, norm_groups=norm_groups)


def _count_blocks(shape, prefix):
    n = 0
    while f"{prefix}{n}.norm1.weight" in shape:
        n += 1
    return n


SD1 = UNetConfig()
SD2 = UNetConfig(context_dim=1024, num_heads=None, head_channels=64, use_linear_in_transformer=True)
SDXL = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                  context_dim=2048, num_heads=None, head_channels=64, use_linear_in_transformer=True,
                  adm_in_channels=2816)
# The SDXL refiner: wider (384), attention only at ds 2 and 4, conditioned on bigG alone (1280) and a y without
# the target size but with an aesthetic score (1280 + 5 x 256).
SDXL_REFINER = UNetConfig(model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
                          context_dim=1280, num_heads=None, head_channels=64, use_linear_in_transformer=True,
                          adm_in_channels=2560)
# Tiny configs for tests: 32 channels still allow the 32 GroupNorm groups of the real models.
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                  context_dim=32, num_heads=4)
TINY_SD2 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      context_dim=32, num_heads=None, head_channels=16, use_linear_in_transformer=True)
TINY_SDXL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
                       transformer_depth_middle=2, context_dim=32, num_heads=None, head_channels=16,
                       use_linear_in_transformer=True, adm_in_channels=64, size_embed_dim=8)
PRESETS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl_refiner": SDXL_REFINER, "tiny": TINY, "tiny_sd2": TINY_SD2, "tiny_sdxl": TINY_SDXL}


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [N] -> [N, dim], cos first (LDM `timestep_embedding`; diffusers `flip_sin_to_cos=True,
    freq_shift=0`). Timesteps may be fractional (k-diffusion samplers map sigmas to non-integer t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sdxl_vector(pooled, size_ids, size_embed_dim: int = 256):
    """SDXL's y: [pooled (B,P) | embed(original h,w, crop top,left, target h,w) (B, 6*size_embed_dim)].

    `size_ids` is [B,6] (diffusers' `add_time_ids`); each scalar gets its own sinusoidal embedding.
    """
    b = size_ids.shape[0]
    sizes = timestep_embedding(size_ids.reshape(-1), size_embed_dim).reshape(b, -1)  # [B*6,E] -> [B,6E]
    return torch.cat([pooled.float(), sizes], dim=1).to(pooled.dtype)


class ResBlock(nn.Module):
    """LDM ResBlock: two 3x3 convs, the time embedding added in between, a 1x1 skip when widths differ."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        # Indices 1 (SiLU) and 2 (Dropout) are real parameter-free layers, as in LDM, keeping the key numbers.
        self.in_layers = nn.Sequential(GroupNorm32(norm_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(norm_groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # [B,C] -> [B,C,1,1], broadcast over H,W
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # `size`: the skip connection's height and width. At latent sizes that do not divide by the UNet's
        # downsampling (SD1 at 520 px: 65 -> 33 -> 17 -> 9), doubling would miss it by one; diffusers passes the
        # skip's size (forward_upsample_size) and A1111 resizes at the concatenation. Nearest to 2H equals x2.
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """LDM's TimestepEmbedSequential: hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context, recorder=None, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, recorder)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig = SD1, *, dtype=None, device=None):
        super().__init__()
        cfg = self.config = config
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc

        def transformer(ch, depth):
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                                      groups)

        with torch.device(device or "cpu"):
            self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if cfg.adm_in_channels is not None:
                # Nested Sequential: the SGM key is `label_emb.0.0.weight`.
                self.label_emb = nn.Sequential(nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
            self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
            skip_widths, ch = [mc], mc
            for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
                for _ in range(cfg.num_res_blocks):
                    layers = [ResBlock(ch, emb_dim, mult * mc, groups)]
                    ch = mult * mc
                    if depth:
                        layers.append(transformer(ch, depth))
                    self.input_blocks.append(EmbedSequential(*layers))
                    skip_widths.append(ch)
                if level != len(cfg.channel_mult) - 1:
                    self.input_blocks.append(EmbedSequential(Downsample(ch)))
                    skip_widths.append(ch)
            self.middle_block = EmbedSequential(ResBlock(ch, emb_dim, ch, groups),
                                                transformer(ch, cfg.transformer_depth_middle),
                                                ResBlock(ch, emb_dim, ch, groups))
            self.output_blocks = nn.ModuleList()
            for level in reversed(range(len(cfg.channel_mult))):
                mult, depth = cfg.channel_mult[level], cfg.transformer_depth[level]
                for r in range(cfg.num_res_blocks + 1):
                    layers = [ResBlock(ch + skip_widths.pop(), emb_dim, mult * mc, groups)]
                    ch = mult * mc
                    if depth:
                        layers.append(transformer(ch, depth))
                    if level and r == cfg.num_res_blocks:
                        layers.append(Upsample(ch))
                    self.output_blocks.append(EmbedSequential(*layers))
            self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        if dtype is not None:
            self.to(dtype)
        for name, module in self.named_modules():
            if isinstance(module, CrossAttention):
                module.layer_name = name

    def _validate(self, x, timesteps, context, y):
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ClipDiffusionError(f"UNet input x: expected [B,{cfg.in_channels},H,W], got {list(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ClipDiffusionError(f"UNet input x: empty spatial size {x.shape[2]}x{x.shape[3]}")
        if context.ndim != 3 or context.shape[2] != cfg.context_dim or context.shape[0] != x.shape[0]:
            raise ClipDiffusionError(f"UNet context: expected [{x.shape[0]},T,{cfg.context_dim}], "
                                     f"got {list(context.shape)}")
        if timesteps.ndim != 1 or timesteps.shape[0] != x.shape[0]:
            raise ClipDiffusionError(f"UNet timesteps: expected [{x.shape[0]}], got {list(timesteps.shape)}")
        if cfg.adm_in_channels is None and y is not None:
            raise ClipDiffusionError("UNet y: this model has no adm_in_channels (label_emb); pass y=None")
        if cfg.adm_in_channels is not None and (y is None or list(y.shape) != [x.shape[0], cfg.adm_in_channels]):
            got = None if y is None else list(y.shape)
            raise ClipDiffusionError(f"UNet y: expected [{x.shape[0]},{cfg.adm_in_channels}], got {got}")

    def _prelude(self, x, timesteps, context, y):
        """What every pass starts with: checked inputs, the time (and SDXL label) embedding, x and context in the
        UNet's dtype -> (h, emb, context)."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        self._validate(x, timesteps, context, y)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        if self.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last):
            # The caller chose NHWC with model.to(memory_format=torch.channels_last): oneDNN convolutions then
            # skip their layout conversions, and the transformers' flatten to tokens becomes a view.
            h = h.contiguous(memory_format=torch.channels_last)
        return h, emb, context

    def forward(self, x, timesteps, context, y=None, *, attention_recorder=None):
        """x [B,C,H,W], timesteps [B] (or a scalar), context [B,T,D], y [B,adm] (SDXL) -> [B,out,H,W].

        With `attention_recorder(layer_name, probs[B,heads,HW,T])`, every cross-attention computes its
        probabilities explicitly and hands them over; otherwise SDPA is used.
        """
        h, emb, context = self._prelude(x, timesteps, context, y)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, attention_recorder)
            skips.append(h)
        h = self.middle_block(h, emb, context, attention_recorder)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [B,C+Cskip,H,W]
            target = skips[-1].shape[-2:] if skips else None  # where this block's Upsample (if any) must land
            h = block(h, emb, context, attention_recorder, upsample_size=target)
        return self.out(h)

    def forward_split(self, x, timesteps, context, y=None, *, branch: int = 1, deep=None, attention_recorder=None):
        """DeepCache's two passes (``diffusion/deepcache.py``; Ma et al., CVPR 2024), at skip branch ``branch``:
        the shallow part is ``input_blocks[0..branch]`` and the last ``branch + 1`` output blocks (branch 1: the
        input convolution and the first res/attention block, and the two output blocks that take their skips).

        ``deep=None``: the whole UNet, returning ``(out, deep)`` where ``deep`` is the feature the deep part hands
        to the shallow output blocks (what ``forward`` computes, op for op: ``out`` equals ``forward``'s).
        ``deep`` given (a tensor from an earlier call on the same rows): only the shallow part runs, with ``deep``
        standing in for everything below it; returns ``(out, deep)``. ``forward`` itself is untouched."""
        n = len(self.input_blocks)
        if not 0 <= branch < n - 1:
            raise ClipDiffusionError(f"DeepCache branch={branch}: must be in [0, {n - 2}] for this UNet")
        h, emb, context = self._prelude(x, timesteps, context, y)
        skips = []
        for block in self.input_blocks[:branch + 1] if deep is not None else self.input_blocks:
            h = block(h, emb, context, attention_recorder)
            skips.append(h)
        first_shallow = n - 1 - branch  # output block that takes input_blocks[branch]'s skip
        if deep is None:
            h = self.middle_block(h, emb, context, attention_recorder)
            for block in self.output_blocks[:first_shallow]:
                h = torch.cat([h, skips.pop()], dim=1)
                target = skips[-1].shape[-2:] if skips else None
                h = block(h, emb, context, attention_recorder, upsample_size=target)
            deep = h
        elif deep.shape[0] != x.shape[0]:
            raise ClipDiffusionError(f"DeepCache: cached feature for {deep.shape[0]} rows, call has {x.shape[0]}")
        h = deep
        for block in self.output_blocks[first_shallow:]:
            h = torch.cat([h, skips.pop()], dim=1)  # [B,C+Cskip,H,W]
            target = skips[-1].shape[-2:] if skips else None
            h = block(h, emb, context, attention_recorder, upsample_size=target)
        return self.out(h), deep


class ConcatConditionedUNet(nn.Module):
    """An inpainting UNet (``in_channels`` = latent + extra, SD's 9 = 4 + mask 1 + masked-image latent 4) seen as a
    latent-to-latent UNet: ``forward(x[B,C,H,W], ...)`` runs the inner UNet on ``cat([x, c_concat])`` along
    channels (LDM's "hybrid" conditioning, diffusers' ``StableDiffusionInpaintPipeline`` order). ``c_concat``
    [b,extra,H,W] is set per generation; a batch that stacks copies of the images (CFG's cond and uncond halves)
    gets it repeated, so B must be a multiple of b."""

    def __init__(self, unet: "UNetModel", c_concat=None):
        super().__init__()
        self.inner = unet
        self.c_concat = c_concat

    @property
    def config(self):
        return self.inner.config

    def _with_concat(self, x):
        c = self.c_concat
        if c is None:
            raise ClipDiffusionError("inpainting UNet: no c_concat (mask and masked-image latents) set")
        if x.shape[0] % c.shape[0] or x.shape[2:] != c.shape[2:]:
            raise ClipDiffusionError(f"inpainting UNet: c_concat {list(c.shape)} does not fit x {list(x.shape)}")
        c = c.to(device=x.device, dtype=x.dtype).repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return torch.cat([x, c], dim=1)

    def forward(self, x, timesteps, context, y=None, **kwargs):
        return self.inner(self._with_concat(x), timesteps, context, y, **kwargs)

    def forward_split(self, x, timesteps, context, y=None, **kwargs):
        """``UNetModel.forward_split`` on the concatenated input (DeepCache works for inpainting models too)."""
        return self.inner.forward_split(self._with_concat(x), timesteps, context, y, **kwargs)
