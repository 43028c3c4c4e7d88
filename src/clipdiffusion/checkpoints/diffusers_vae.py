"""diffusers `AutoencoderKL` <-> LDM (our) VAE names and configs.

As for the UNet, one block table generated from the config: each entry pairs an LDM prefix with a diffusers
prefix and a kind. ResnetBlocks rename only `nin_shortcut` (diffusers `conv_shortcut`); the mid attention renames
its four projections and reshapes them, since LDM uses 1x1 convs [C,C,1,1] and diffusers Linear layers [C,C].
diffusers files written before diffusers 0.14 call those projections query/key/value/proj_attn; both are read.
Mapping per checkpoints reference §5.3.
"""

from ..errors import ClipDiffusionError
from . import config_values as V
from . import unfit_keys_error
from .config_values import ConfigValueError, config_error, show

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()} | {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RES_BACK = {"conv_shortcut": "nin_shortcut"}
_RES_LAYERS = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut", "conv_shortcut")


def vae_block_table(config) -> list[tuple[str, str, str]]:
    """[(ldm_prefix, diffusers_prefix, kind)] with kind "plain" | "res" | "attn"."""
    n = len(config.ch_mult)
    table = [(name, name, "plain") for name in ("encoder.conv_in", "decoder.conv_in", "quant_conv", "post_quant_conv",
                                                "encoder.conv_out", "decoder.conv_out")]
    table += [(f"{part}.norm_out", f"{part}.conv_norm_out", "plain") for part in ("encoder", "decoder")]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "res"),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "attn"),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "res")]
    for i in range(n):
        table += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "res")
                  for j in range(config.num_res_blocks)]
        if i != n - 1:
            table.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", "plain"))
        # diffusers counts decoder blocks from the lowest resolution, LDM from the highest.
        level = n - 1 - i
        table += [(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "res")
                  for j in range(config.num_res_blocks + 1)]
        if level != 0:
            table.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", "plain"))
    return table


def _split(key, prefixes):
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            return head, ".".join(parts[n:])
    return None, None


def _convert(sd, config, to_diffusers: bool, source: str):
    lookup = {(ldm if to_diffusers else diff): ((diff if to_diffusers else ldm), kind)
              for ldm, diff, kind in vae_block_table(config)}
    out, unknown = {}, []
    for key, value in sd.items():
        prefix, rest = _split(key, lookup)
        if prefix is None:
            unknown.append(key)
            continue
        target, kind = lookup[prefix]
        layer, _, param = rest.rpartition(".")
        if param not in ("weight", "bias") or (kind == "plain" and layer) or (
                kind == "res" and layer not in _RES_LAYERS):
            unknown.append(key)
            continue
        if kind == "res":
            layer = ({"nin_shortcut": "conv_shortcut"} if to_diffusers else _RES_BACK).get(layer, layer)
        elif kind == "attn":
            renamed = (_ATTN if to_diffusers else _ATTN_BACK).get(layer)
            if renamed is None:
                unknown.append(key)
                continue
            if param == "weight" and renamed not in ("norm", "group_norm"):
                # 1x1 conv [C,C,1,1] <-> Linear [C,C]
                value = value.reshape(value.shape[:2]) if to_diffusers else value.reshape(*value.shape[:2], 1, 1)
            layer = renamed
        out[".".join(filter(None, (target, layer, param)))] = value
    if unknown:
        raise unfit_keys_error(source, "VAE", to_diffusers, unknown)
    return out


def vae_diffusers_to_ldm(sd, config, *, source="diffusers VAE state dict"):
    """diffusers AutoencoderKL state dict (current or pre-0.14 attention names) -> our (LDM) names."""
    return _convert(sd, config, False, source)


def vae_ldm_to_diffusers(sd, config, *, source="VAE state dict"):
    """Our (LDM) VAE state dict -> diffusers AutoencoderKL names (current attention names)."""
    return _convert(sd, config, True, source)


def vae_config_from_diffusers(d: dict, *, source=None):
    """A diffusers `vae/config.json` dict -> VAEConfig. Every value read is type-checked first; a bad or
    unsupported one raises naming the key and the value: ``CheckpointError(source, ...)`` when ``source`` (the
    file) is given, else ``ClipDiffusionError("diffusers VAE config ...")``."""
    try:
        return _vae_config(d)
    except ClipDiffusionError as exc:
        raise config_error(source, "VAE", exc) from None


def _vae_config(d: dict):
    from ..diffusion.vae import VAEConfig

    if not isinstance(d, dict):
        raise ConfigValueError(f"must be a JSON object, got {type(d).__name__}")
    # latents_mean/std: diffusers' SDXL pipeline would de-normalise latents with them before decoding.
    fixed = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}
    for field, expected in fixed.items():
        if d.get(field, expected) != expected:
            raise ConfigValueError(f"{field}={show(d[field])} is not supported (only {expected!r})")
    boc = V.get_int_list(d, "block_out_channels", [64])
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ConfigValueError(f"block_out_channels={show(boc)}: not multiples of {ch}")
    for field, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(field, [kind])
        if not isinstance(types, (list, tuple)) or list(types) != [kind] * len(boc):
            raise ConfigValueError(f"{field}={show(types)}: expected {len(boc)} x {kind}")
    groups = V.get_int(d, "norm_num_groups", 32)
    if any(c % groups for c in boc):
        raise ConfigValueError(f"norm_num_groups={groups}: does not divide every block_out_channels entry "
                               f"{show(boc)}")
    latent = V.get_int(d, "latent_channels", 4)
    return VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in boc),
                     num_res_blocks=V.get_int(d, "layers_per_block", 1, maximum=V.MAX_COUNT), z_channels=latent,
                     embed_dim=latent, in_channels=V.get_int(d, "in_channels", 3),
                     out_channels=V.get_int(d, "out_channels", 3),
                     scale_factor=V.get_positive_float(d, "scaling_factor", 0.18215), norm_groups=groups)


def vae_config_to_diffusers(config, *, sample_size: int = 512) -> dict:
    """VAEConfig -> a diffusers `vae/config.json` dict."""
    if config.embed_dim != config.z_channels:
        raise ClipDiffusionError(f"VAEConfig embed_dim={config.embed_dim} != z_channels={config.z_channels}: "
                                 f"diffusers' AutoencoderKL has one latent_channels for both")
    n = len(config.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
            "act_fn": "silu", "latent_channels": config.z_channels, "norm_num_groups": config.norm_groups,
            "sample_size": sample_size, "scaling_factor": config.scale_factor,
            # diffusers' default: decode fp16 models in fp32 (SDXL's VAE overflows in fp16, reference §4.5).
            "force_upcast": True}
