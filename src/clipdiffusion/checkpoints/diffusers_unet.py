"""diffusers `UNet2DConditionModel` <-> LDM (our) UNet names and configs.

One block table, generated from the `UNetConfig` by walking the same structure `UNetModel` builds: each entry
pairs an LDM block prefix with its diffusers prefix and a kind. Inside a block, ResBlocks rename six sub-layers
(LDM `in_layers.0` = diffusers `norm1`, ...); SpatialTransformers keep identical inner names; plain entries are
single layers. Mapping per checkpoints reference §5.2 (diffusers `convert_from_ckpt.py` does the same with
string surgery).
"""

from ..errors import ClipDiffusionError
from . import config_values as V
from . import unfit_keys_error
from .config_values import ConfigValueError, config_error, show

# LDM ResBlock sub-layer -> diffusers ResnetBlock2D sub-layer
_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RES_BACK = {v: k for k, v in _RES.items()}


def unet_block_table(config) -> list[tuple[str, str, str]]:
    """[(ldm_prefix, diffusers_prefix, kind)] with kind "plain" | "res" | "attn"."""
    nres, levels = config.num_res_blocks, len(config.channel_mult)
    table = [("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain"), ("input_blocks.0.0", "conv_in", "plain"),
             ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    if config.adm_in_channels is not None:
        table += [("label_emb.0.0", "add_embedding.linear_1", "plain"),
                  ("label_emb.0.2", "add_embedding.linear_2", "plain")]
    for b in range(levels):
        has_attn = config.transformer_depth[b] > 0
        for r in range(nres):
            i = 1 + b * (nres + 1) + r
            table.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{r}", "res"))
            if has_attn:
                table.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{r}", "attn"))
        if b != levels - 1:
            table.append((f"input_blocks.{(b + 1) * (nres + 1)}.0.op", f"down_blocks.{b}.downsamplers.0.conv", "plain"))
    table += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "res")]
    for b in range(levels):  # diffusers up_blocks.0 is the lowest resolution, as output_blocks.0 is
        level = levels - 1 - b
        has_attn = config.transformer_depth[level] > 0
        for r in range(nres + 1):
            i = b * (nres + 1) + r
            table.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{r}", "res"))
            if has_attn:
                table.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{r}", "attn"))
            if level and r == nres:
                table.append((f"output_blocks.{i}.{2 if has_attn else 1}.conv",
                              f"up_blocks.{b}.upsamplers.0.conv", "plain"))
    return table


def _split(key, prefixes):
    """Longest table prefix of `key` -> (prefix, rest) or (None, None)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            return head, ".".join(parts[n:])
    return None, None


_ATTN_PARTS = ("norm", "proj_in", "proj_out", "transformer_blocks")  # same names on both sides


def _rename_inner(rest, kind, mapping):
    if kind == "attn":
        return rest if rest.split(".")[0] in _ATTN_PARTS else None
    if kind == "plain":
        return rest if rest in ("weight", "bias") else None
    for src, dst in mapping.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def _convert(sd, config, to_diffusers: bool, source: str):
    table = unet_block_table(config)
    lookup = {(ldm if to_diffusers else diff): ((diff if to_diffusers else ldm), kind) for ldm, diff, kind in table}
    inner = _RES if to_diffusers else _RES_BACK
    out, unknown = {}, []
    for key, value in sd.items():
        prefix, rest = _split(key, lookup)
        target, kind = lookup.get(prefix, (None, None))
        new_rest = _rename_inner(rest, kind, inner) if target else None
        if new_rest is None:
            unknown.append(key)
            continue
        if kind == "attn" and new_rest.split(".")[0] in ("proj_in", "proj_out") and new_rest.endswith("weight"):
            # Some converted files store SD1's 1x1-conv projections as Linear or the reverse; the config decides.
            value = value.reshape(value.shape[:2]) if config.use_linear_in_transformer else value.reshape(
                *value.shape[:2], 1, 1)
        out[f"{target}.{new_rest}"] = value
    if unknown:
        raise unfit_keys_error(source, "UNet", to_diffusers, unknown)
    return out


def unet_diffusers_to_ldm(sd, config, *, source="diffusers UNet state dict"):
    """diffusers UNet2DConditionModel state dict -> our (LDM) names. Every key must map."""
    return _convert(sd, config, False, source)


def unet_ldm_to_diffusers(sd, config, *, source="UNet state dict"):
    """Our (LDM) UNet state dict -> diffusers UNet2DConditionModel names. Every key must map."""
    return _convert(sd, config, True, source)


# diffusers config values we do not implement; anything else means a different architecture.
_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
          "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
          "conv_out_kernel": 3, "class_embed_type": None, "encoder_hid_dim": None, "dual_cross_attention": False,
          "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default",
          "time_cond_proj_dim": None, "time_embedding_dim": None, "reverse_transformer_layers_per_block": None,
          "class_embeddings_concat": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
          "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "timestep_post_act": None,
          "time_embedding_act_fn": None, "cross_attention_norm": None, "norm_eps": 1e-5, "num_class_embeds": None,
          "encoder_hid_dim_type": None}


_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}


def unet_config_from_diffusers(d: dict, *, source=None):
    """A diffusers `unet/config.json` dict -> UNetConfig. Every value read is type-checked first; a bad or
    unsupported one raises naming the key and the value: ``CheckpointError(source, ...)`` when ``source`` (the
    file) is given, else ``ClipDiffusionError("diffusers UNet config ...")``."""
    try:
        return _unet_config(d)
    except ClipDiffusionError as exc:
        raise config_error(source, "UNet", exc) from None


def _unet_config(d: dict):
    from ..diffusion.unet import UNetConfig

    if not isinstance(d, dict):
        raise ConfigValueError(f"must be a JSON object, got {type(d).__name__}")
    for field, expected in _FIXED.items():
        if field in d and d[field] != expected:
            raise ConfigValueError(f"{field}={show(d[field])} is not supported (only {expected!r})")
    boc = V.get_int_list(d, "block_out_channels", [320, 640, 1280, 1280])
    n, mc = len(boc), boc[0]
    if any(c % mc for c in boc):
        raise ConfigValueError(f"block_out_channels={show(boc)}: not multiples of {mc}")
    down = V.get_str_list(d, "down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], choices=_DOWN)
    up = V.get_str_list(d, "up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, choices=_UP)
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if [t == "CrossAttnUpBlock2D" for t in reversed(up)] != attn or len(down) != n:
        raise ConfigValueError(f"down_block_types={show(down)} / up_block_types={show(up)}: must mirror each "
                               f"other, one per block_out_channels entry")
    # diffusers takes one count or one per level (up blocks: the level's count + 1); LDM's UNet has one count.
    layers = V.get_int_or_list(d, "layers_per_block", 2, length=n, maximum=V.MAX_COUNT)
    if isinstance(layers, list):
        if len(set(layers)) != 1:
            raise ConfigValueError(f"layers_per_block={show(layers)}: different counts per level cannot be built "
                                   f"(the LDM UNet has one num_res_blocks)")
        layers = layers[0]
    raw_tl = d.get("transformer_layers_per_block", 1)
    if isinstance(raw_tl, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in raw_tl):
        raise ConfigValueError(f"transformer_layers_per_block={show(raw_tl)}: per-block lists unsupported")
    tl = V.get_int_or_list(d, "transformer_layers_per_block", 1, length=n, minimum=0, maximum=V.MAX_COUNT)
    tl = tl if isinstance(tl, list) else [tl] * n
    if any(tl[i] < 1 for i in range(n) if attn[i]) or tl[-1] < 1:
        raise ConfigValueError(f"transformer_layers_per_block={show(raw_tl)}: must be at least 1 for every "
                               f"cross-attention block and the middle block")
    # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (a null first key falls back).
    head_key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
    raw_heads = V.get_int_or_list(d, head_key, 8, length=n)
    heads = raw_heads if isinstance(raw_heads, list) else [raw_heads] * n
    if isinstance(d.get("cross_attention_dim"), (list, tuple)):
        raise ConfigValueError(f"cross_attention_dim={show(d['cross_attention_dim'])}: per-level widths "
                               f"unsupported")
    context = V.get_int(d, "cross_attention_dim", 1280)
    linear = bool(V.get_bool(d, "use_linear_projection", False, optional=True))
    groups = V.get_int(d, "norm_num_groups", 32)
    if any(c % groups for c in boc):
        raise ConfigValueError(f"norm_num_groups={groups}: does not divide every block_out_channels entry "
                               f"{show(boc)}")
    # `attention_head_dim` historically holds head *counts*; the mid block uses the last level's. One number is a
    # fixed count (SD1: 8); a list is per level and, in SD2/SDXL, encodes a fixed head width (64).
    used = [(boc[i], heads[i]) for i in range(n) if attn[i]] + [(boc[-1], heads[-1])]
    widths = {c // h for c, h in used}
    same_width = len(widths) == 1 and all(c % h == 0 for c, h in used) and min(widths) > 0
    if isinstance(raw_heads, int):
        num_heads, head_channels = raw_heads, None
    elif same_width:
        num_heads, head_channels = None, widths.pop()
    elif len({h for _, h in used}) == 1:
        num_heads, head_channels = heads[-1], None
    else:
        raise ConfigValueError(f"{head_key}={show(heads)}: neither a fixed head count nor a fixed head width")
    bad = [c for c, h in used if c % h]
    if num_heads is not None and bad:
        raise ConfigValueError(f"{head_key}={show(raw_heads)}: {num_heads} heads do not divide the {bad[0]} "
                               f"channels of an attention block")
    adm, size_dim = None, 256
    embed_type = d.get("addition_embed_type")
    if embed_type == "text_time":
        try:
            adm = V.get_int(d, "projection_class_embeddings_input_dim")
            size_dim = V.get_int(d, "addition_time_embed_dim", None, optional=True) or 256
        except ConfigValueError as exc:
            raise ConfigValueError(f"addition_embed_type='text_time': {exc.reason}") from None
    elif embed_type is not None:
        raise ConfigValueError(f"addition_embed_type={show(embed_type)} is not supported")
    return UNetConfig(in_channels=V.get_int(d, "in_channels", 4), out_channels=V.get_int(d, "out_channels", 4),
                      model_channels=mc, channel_mult=tuple(c // mc for c in boc), num_res_blocks=layers,
                      transformer_depth=tuple(tl[i] if attn[i] else 0 for i in range(n)),
                      transformer_depth_middle=tl[-1], context_dim=context, num_heads=num_heads,
                      head_channels=head_channels, use_linear_in_transformer=linear, adm_in_channels=adm,
                      size_embed_dim=size_dim, norm_groups=groups)


def unet_default_size(d: dict, downsample_factor: int) -> int | None:
    """diffusers' default image size, ``sample_size`` x the VAE's downsampling (pixels), or None when sample_size is
    absent, a [height, width] pair or out of range: it is never required, so an odd value is not an error."""
    size = d.get("sample_size") if isinstance(d, dict) else None
    if not V.is_int(size) or not 1 <= size * downsample_factor <= 16384:
        return None
    return size * downsample_factor


def unet_config_to_diffusers(config, *, sample_size: int = 64) -> dict:
    """UNetConfig -> a diffusers `unet/config.json` dict (sample_size is the native latent size: 64 SD1, 128 SDXL)."""
    boc = [m * config.model_channels for m in config.channel_mult]
    depth = [d if d else 1 for d in config.transformer_depth]
    # diffusers takes the mid block's depth from the last entry; a last level without attention can carry it.
    if config.transformer_depth[-1] == 0:
        depth[-1] = config.transformer_depth_middle
    elif depth[-1] != config.transformer_depth_middle:
        raise ClipDiffusionError(f"UNetConfig transformer_depth_middle={config.transformer_depth_middle} differs "
                                 f"from the last level's depth {depth[-1]}; diffusers cannot express that")
    heads = [config.heads_for(c)[0] for c in boc]
    d = {"_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": config.in_channels,
         "out_channels": config.out_channels,
         "down_block_types": ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in config.transformer_depth],
         "up_block_types": ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(config.transformer_depth)],
         "block_out_channels": boc, "layers_per_block": config.num_res_blocks, "norm_num_groups": config.norm_groups,
         "cross_attention_dim": config.context_dim,
         "attention_head_dim": config.num_heads if config.num_heads is not None else heads,
         "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
         "use_linear_projection": config.use_linear_in_transformer}
    d.update({k: v for k, v in _FIXED.items() if v is not None and k != "reverse_transformer_layers_per_block"})
    if config.adm_in_channels is not None:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=config.size_embed_dim,
                 projection_class_embeddings_input_dim=config.adm_in_channels)
    return d
