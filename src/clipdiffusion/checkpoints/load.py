"""Single-file checkpoints and diffusers folders -> ready components (text encoder, UNet, VAE).

Loading is strict (style rule 2): every tensor in the file is either loaded, or on the short named list of
ignorable keys (detect.py), and one ``CheckpointError`` lists every missing, unexpected and mis-shaped key of
every component. Models are built on the meta device and adopt the loaded tensors, so no random weights are
ever allocated (build.py). Hyperparameters that weights cannot reveal (head split, norm groups, scale factor,
prediction) come from our own metadata when we wrote the file, else from the family. Text towers are read by
text_encoders.py, where the family table says they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ClipDiffusionError
from ..families import get_family
from ..text.conditioning import TextEncoder
from . import config_values as V
from . import detect
from .build import build_module
from .build import expected_shapes as _expected
from .build import integer_weights as _integer_weights
from .build import key_problems as _problems
from .build import text_configs_from_metadata as _text_configs
from .build import unet_config_for as _unet_config
from .build import vae_config_for as _vae_config
from .config_values import ConfigValueError, show
from .safetensors_io import is_pickle_path, load_file, read_shapes
from .text_encoders import text_encoders_from_diffusers, text_encoders_from_state_dict, text_weight_keys
from .text_layouts import DIFFUSERS_TEXT_FOLDERS


@dataclass(frozen=True)
class LoadedModel:
    family: str  # "sd1" | "sd2" | "sdxl" | "tiny"
    prediction: str  # "eps" | "v"
    text_encoder: object  # text.conditioning.TextEncoder
    unet: object  # diffusion.unet.UNetModel
    vae: object  # diffusion.vae.AutoencoderKL
    unet_config: object
    vae_config: object
    metadata: dict = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    source: str = ""
    copied_pickles: tuple[str, ...] = ()  # with mmap=True: the pickled files that were copied, not mapped

    @property
    def default_size(self) -> int | None:
        """Native image size from ModelSpec ``modelspec.resolution`` ("512x512"), when the file records it."""
        return resolution_from_metadata(self.metadata)


def resolution_from_metadata(metadata: dict) -> int | None:
    value = str(metadata.get("modelspec.resolution", ""))
    width, _, height = value.partition("x")
    if width.isdigit() and width == height and 0 < int(width) <= 16384:
        return int(width)
    return None


def check_sdxl_vector(family, unet_config, text_encoder, source, what):
    """SDXL's UNet takes y = [pooled bigG text | 6 size embeddings] (unet.sdxl_vector): its ``adm_in_channels``
    must equal that width, or every generation would fail. The weights fix adm_in_channels and the pooled width;
    ``size_embed_dim`` comes from a config (``what``), so a wrong one is named here, at load time."""
    if not get_family(family).pooled or unet_config.adm_in_channels is None:
        return
    tower = text_encoder.encoders[-1].model.config
    pooled = tower.projection_dim or tower.width
    size = unet_config.size_embed_dim
    if pooled + 6 * size != unet_config.adm_in_channels:
        raise CheckpointError(source, f"{what}: size_embed_dim={size} does not fit: the UNet's y width "
                                      f"{unet_config.adm_in_channels} must be the pooled text width {pooled} + 6 x "
                                      f"size_embed_dim")  # fmt: skip


# --- single files ------------------------------------------------------------------------------------------


def check_placement(dtype, device):
    """``dtype``/``device`` arguments as torch objects; bad values are user errors naming the field."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ClipDiffusionError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    try:
        return dtype, torch.device(device)
    except (RuntimeError, TypeError):
        raise ClipDiffusionError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def check_mmap(mmap) -> bool:
    if not isinstance(mmap, bool):
        raise ClipDiffusionError(f"mmap must be True or False, got {mmap!r}")
    return mmap


def load_checkpoint(path, *, dtype=torch.float32, device="cpu", prediction=None, mmap=False) -> LoadedModel:
    """Load an LDM/SGM single-file checkpoint (.safetensors, or a pickle through the weights-only unpickler).

    ``dtype=None`` keeps each tensor's stored dtype (mixed-dtype files stay mixed). ``mmap=True`` leaves the
    weights of a ``.safetensors`` file as views of the file mapping where no cast or device move is asked
    (``load_file(copy=False)``: see its risks); a pickle is copied as without it (``copied_pickles`` names it)."""
    dtype, device = check_placement(dtype, device)
    mmap = check_mmap(mmap)
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise CheckpointError(path, "is a folder: load a diffusers folder with load_diffusers / from_pretrained")
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    # pickles are memory-mapped, so this reads no tensor data; load_file below copies what is used
    shapes, dtypes, metadata = read_shapes(path)
    fam = detect.detect_family(shapes, metadata, prediction=prediction, path=source)
    unet_config = _unet_config(fam.name, shapes, metadata, source)
    vae_config = _vae_config(fam.name, shapes, metadata, source)
    text_configs = _text_configs(metadata, source)

    from ..diffusion.unet import UNetModel
    from ..diffusion.vae import AutoencoderKL

    text_prefixes = ("cond_stage_model.", "conditioner.")
    unet_keys = [k for k in shapes if k.startswith(detect.UNET_PREFIX) and not detect.is_ignored_key(k)]
    vae_keys = [k for k in shapes if k.startswith(detect.VAE_PREFIX) and not detect.is_ignored_key(k)]
    text_keys = [k for k in shapes if k.startswith(text_prefixes)]
    ignored = [k for k in shapes if detect.is_ignored_key(k) and not k.startswith(text_prefixes)]
    stray = sorted(set(shapes) - set(unet_keys) - set(vae_keys) - set(text_keys) - set(ignored))
    unet_meta, vae_meta = UNetModel(unet_config, device="meta"), AutoencoderKL(vae_config, device="meta")
    problems = _problems("UNet", _expected(unet_meta, detect.UNET_PREFIX), {k: shapes[k] for k in unet_keys})
    problems += _problems("VAE", _expected(vae_meta, detect.VAE_PREFIX), {k: shapes[k] for k in vae_keys})
    if stray:
        problems.append(f"unexpected keys outside any component ({len(stray)}): {', '.join(stray)}")
    if not problems:  # the text towers where the family table says (SD2 also in SGM form), by their file names
        text_weights = set(text_weight_keys({k: shapes[k] for k in text_keys}, family=fam.record, source=source))
        weight_keys = unet_keys + vae_keys + [k for k in text_keys if k in text_weights]
        problems = _integer_weights(dtypes, weight_keys)
    if problems:
        raise CheckpointError(path, f"{fam.name} checkpoint does not match: " + "; ".join(problems))

    # cast and place while copying out of the file mapping: peak memory is the loaded model, not twice it
    pickled = mmap and is_pickle_path(path)
    tensors = load_file(path, keys=unet_keys + vae_keys + text_keys, dtype=dtype, device=device,
                        copy=not mmap or pickled)  # fmt: skip
    text = text_encoders_from_state_dict({k: tensors[k] for k in text_keys}, family=fam.record,
                                         configs=text_configs, configs_from=f"metadata {detect.META_TEXT}",
                                         source=source, dtype=dtype, device=device)  # fmt: skip
    text_encoder, text_ignored = TextEncoder(text.family, text.encoders), text.ignored
    check_sdxl_vector(fam.name, unet_config, text_encoder, source, f"metadata {detect.META_UNET}"
                      if detect.META_UNET in metadata else "UNet")  # fmt: skip
    n_unet, n_vae = len(detect.UNET_PREFIX), len(detect.VAE_PREFIX)
    unet = build_module(UNetModel, unet_config, {k[n_unet:]: tensors[k] for k in unet_keys}, dtype=dtype,
                        device=device, model=unet_meta)  # fmt: skip
    vae = build_module(AutoencoderKL, vae_config, {k[n_vae:]: tensors[k] for k in vae_keys}, dtype=dtype,
                       device=device, model=vae_meta)  # fmt: skip
    return LoadedModel(
        family=fam.name, prediction=fam.prediction, text_encoder=text_encoder, unet=unet, vae=vae,
        unet_config=unet_config, vae_config=vae_config, metadata=dict(metadata),
        ignored_keys=tuple(sorted(set(ignored) | set(text_ignored))), notes=fam.notes, source=source,
        copied_pickles=(source,) if pickled else (),
    )  # fmt: skip


# --- diffusers folders -------------------------------------------------------------------------------------

_MAX_JSON_BYTES = 10_000_000
_SHARD_NAME = re.compile(r"^[\w.\-]+\.safetensors$")
_VARIANT = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionInpaintPipeline",
             "StableDiffusionXLInpaintPipeline"}


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_JSON_BYTES + 1)  # bounded even if the file grows after the check above
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > _MAX_JSON_BYTES:
        raise CheckpointError(path, f"JSON file larger than {_MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return data


def component_weights(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The weight files of one component: single, variant (``.fp16``), sharded (index), or legacy ``.bin``."""
    if variant is not None and not _VARIANT.fullmatch(str(variant)):
        raise ClipDiffusionError(f"variant must be a plain name such as 'fp16', got {variant!r}")
    names = [f"{stem}.{variant}" if variant else None, stem]
    for name in filter(None, names):
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(index, "weight_map must be a non-empty object")
            odd = [v for v in weight_map.values() if not isinstance(v, str)]
            if odd:
                raise CheckpointError(index, f"weight_map names invalid shard files {show(odd[:5])}")
            files = sorted(set(weight_map.values()))
            # Shard names come from the file: plain names inside this folder only, no path traversal.
            bad = [f for f in files if not isinstance(f, str) or not _SHARD_NAME.fullmatch(f) or ".." in f]
            if bad:
                raise CheckpointError(index, f"weight_map names invalid shard files {bad[:5]}")
            return [folder / f for f in files]
    legacy = folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if legacy.is_file():
        return [legacy]
    variants = sorted({f.name[len(stem) + 1:].split(".")[0] for f in folder.glob(f"{stem}.*.safetensors*")})
    hint = f"; variants present: {', '.join(variants)} (pass variant=...)" if variants else ""
    raise CheckpointError(folder, f"no {stem}.safetensors, {stem}.safetensors.index.json or .bin weights{hint}")


def load_component_files(files, *, dtype=None, device="cpu", mmap=False, copied=None) -> dict:
    """Every tensor of one component's files. Weights stored as integers or bools are refused from each file's
    header, before its data is read; ignorable buffers (``position_ids``, detect.is_ignored_key) may be integers.
    ``mmap=True`` maps ``.safetensors`` files (``load_file(copy=False)``); pickles are copied and appended to the
    list ``copied``."""
    tensors = {}
    for f in files:
        _, dtypes, _ = read_shapes(f)
        problems = _integer_weights(dtypes, [k for k in dtypes if not detect.is_ignored_key(k)])
        if problems:
            raise CheckpointError(f, problems[0])
        pickled = is_pickle_path(f)
        if mmap and pickled and copied is not None:
            copied.append(str(f))
        part = load_file(f, dtype=dtype, device=device, copy=not mmap or pickled)
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise CheckpointError(f, f"keys repeated across shards: {dup[:5]}")
        tensors.update(part)
    return tensors


def diffusers_family_from_structure(folder, unet_json: dict) -> str:
    """The family of a diffusers folder that does not name one, from its structure at any size
    (detect.family_from_diffusers): the UNet config and the configs of the text towers the folder has."""
    folder = Path(folder)
    towers = {sub: read_json(folder / sub / "config.json")
              for sub in ("text_encoder", "text_encoder_2") if (folder / sub).is_dir()}  # fmt: skip
    return detect.family_from_diffusers(unet_json, "text_encoder_2" in towers, path=str(folder), text_configs=towers)


def tokenizer_pad_notes(folder, family, encoders) -> tuple[str, ...]:
    """We pad prompts as the family's recipe says (CLIP-L towers with EOS, OpenCLIP towers with 0); diffusers pads
    with the folder's tokenizer's pad token. A note when the two disagree (both known), since images then differ."""
    notes = []
    for sub, spec in zip(("tokenizer", "tokenizer_2"), encoders):
        files = [Path(folder) / sub / n for n in ("tokenizer_config.json", "special_tokens_map.json")]
        try:  # we never read the tokenizer otherwise: a broken one is not an error here
            pad, pad_id = V.clip_pad_token(next((read_json(f) for f in files if f.is_file()), {}))
        except CheckpointError:
            continue
        if pad_id is not None and pad_id != spec.pad_id:
            notes.append(f"{sub} pads with {pad!r} (id {pad_id}) but the {family} recipe pads {spec.name} with id "
                         f"{spec.pad_id}: diffusers' own pipeline conditions on this folder differently")
    return tuple(notes)


def diffusers_prediction(folder, family, override):
    if override is not None:
        if override not in detect.PREDICTIONS:
            raise CheckpointError(folder, f"prediction must be one of {detect.PREDICTIONS}, got {override!r}")
        return override, ()
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        kind = read_json(scheduler).get("prediction_type", "epsilon")
        if not isinstance(kind, str) or kind not in ("epsilon", "v_prediction"):
            raise CheckpointError(scheduler, f"prediction_type={show(kind)} is not supported (epsilon, v_prediction)")
        return ("v" if kind == "v_prediction" else "eps"), ()
    note = f"no scheduler/scheduler_config.json: using the {family} default prediction"
    return get_family(family).default_prediction, (note,)


def _diffusers_text_encoder(folder, family, configs, variant, *, dtype, device, mmap=False, copied=None):
    """The text_encoder*/ folders, each read in its own (transformers) layout with its config.json, then the
    family's recipes: no conversion to a single-file layout and back."""
    folders = [(sub, load_component_files(component_weights(folder / sub, "model", variant), mmap=mmap,
                                          copied=copied))
               for sub in DIFFUSERS_TEXT_FOLDERS[:len(configs)]]  # fmt: skip
    text = text_encoders_from_diffusers(family, folders, configs, source=str(folder), dtype=dtype, device=device)
    return TextEncoder(text.family, text.encoders), tuple(text.ignored)


def _text_configs_from_diffusers(folder, family):
    from ..text.clip import ACTIVATIONS, CLIPTextConfig
    from ..text.tokenizer import VOCAB_SIZE

    configs = []
    for sub in DIFFUSERS_TEXT_FOLDERS[:len(get_family(family).towers)]:
        path = folder / sub / "config.json"
        c = read_json(path)
        try:
            width = V.get_int(c, "hidden_size")
            mlp = V.get_int(c, "intermediate_size", None, optional=True)
            vocab = V.get_int(c, "vocab_size", VOCAB_SIZE, maximum=1 << 24)
            if vocab < VOCAB_SIZE:  # every prompt goes through CLIP's BPE (ids up to 49407)
                raise ConfigValueError(f"vocab_size={vocab}: smaller than CLIP's {VOCAB_SIZE}-token vocabulary; the "
                                       "folder's tokenizer is not CLIP's BPE, and other tokenizers are not supported")
            configs.append(CLIPTextConfig(
                vocab_size=vocab, width=width,
                layers=V.get_int(c, "num_hidden_layers", maximum=1024), heads=V.get_int(c, "num_attention_heads"),
                max_positions=V.get_int(c, "max_position_embeddings", 77),
                activation=V.get_str(c, "hidden_act", "quick_gelu", choices=ACTIVATIONS),
                layer_norm_eps=V.get_positive_float(c, "layer_norm_eps", 1e-5),
                projection_dim=V.get_int(c, "projection_dim", None, optional=True) if sub == "text_encoder_2" else None,
                mlp_width=mlp if mlp != 4 * width else None,
            ))  # fmt: skip
        except ConfigValueError as exc:
            raise CheckpointError(path, exc.reason) from None
        except ClipDiffusionError as exc:
            raise CheckpointError(path, f"unsupported text encoder config: {exc}") from None
    return configs


def load_diffusers(folder, *, dtype=torch.float32, device="cpu", prediction=None, variant=None,
                   mmap=False) -> LoadedModel:  # fmt: skip
    """Load a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/[, text_encoder_2/]);
    ``mmap`` as in ``load_checkpoint`` (legacy ``.bin`` weights are copied)."""
    dtype, device = check_placement(dtype, device)
    mmap = check_mmap(mmap)
    copied: list[str] = []
    from ..diffusion.unet import UNetModel
    from ..diffusion.vae import AutoencoderKL
    from .diffusers_unet import unet_config_from_diffusers, unet_default_size, unet_diffusers_to_ldm
    from .diffusers_vae import vae_config_from_diffusers, vae_diffusers_to_ldm

    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = read_json(index_path)
    kind = index.get("_class_name")
    if not isinstance(kind, str) or kind not in PIPELINES:
        raise CheckpointError(index_path, f"_class_name={show(kind)} is not one of {sorted(PIPELINES)}")
    # Every config value is type-checked before anything is built from it; errors name the file and the key.
    unet_json = read_json(folder / "unet" / "config.json")
    unet_config = unet_config_from_diffusers(unet_json, source=folder / "unet" / "config.json")
    vae_config = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"),
                                           source=folder / "vae" / "config.json")  # fmt: skip
    # Folders we wrote name their family (tiny sizes match no public one); diffusers ignores "_" keys.
    family = index.get(detect.DIFFUSERS_FAMILY_KEY)
    if family is not None and (not isinstance(family, str) or family not in detect.FAMILIES):
        raise CheckpointError(index_path, f"{detect.DIFFUSERS_FAMILY_KEY}={show(family)} is unknown "
                                          f"(one of {list(detect.FAMILIES)})")  # fmt: skip
    metadata = {"model_index": json.dumps(index)}
    if family is None:  # someone else's folder: its structure says the family, its sample_size the native size
        family = diffusers_family_from_structure(folder, unet_json)
        size = unet_default_size(unet_json, vae_config.downsample_factor)
        metadata.update({"modelspec.resolution": f"{size}x{size}"} if size else {})
    latent = vae_config.embed_dim  # an inpainting UNet takes latent + mask + masked-image latent channels
    if unet_config.out_channels != latent or unet_config.in_channels not in (latent, 2 * latent + 1):
        raise CheckpointError(folder, f"unet in_channels={unet_config.in_channels} and out_channels="
                                      f"{unet_config.out_channels} must equal the vae latent_channels="
                                      f"{latent} (in_channels {2 * latent + 1} for an inpainting UNet)")  # fmt: skip
    pred, notes = diffusers_prediction(folder, family, prediction)
    text_configs = _text_configs_from_diffusers(folder, family)

    problems = []
    parts, metas = {}, {}
    for name, cls, config, convert in (("unet", UNetModel, unet_config, unet_diffusers_to_ldm),
                                       ("vae", AutoencoderKL, vae_config, vae_diffusers_to_ldm)):  # fmt: skip
        metas[name] = cls(config, device="meta")
        raw = load_component_files(component_weights(folder / name, "diffusion_pytorch_model", variant),
                                   dtype=dtype, device=device, mmap=mmap, copied=copied)  # fmt: skip
        try:
            ldm = convert(raw, config, source=str(folder / name))
        except CheckpointError as exc:
            problems.append(exc.reason)
            continue
        shapes = {k: tuple(v.shape) for k, v in ldm.items()}
        problems += _problems(name.upper() if name == "vae" else "UNet", _expected(metas[name]), shapes)
        parts[name] = ldm
    if problems:
        raise CheckpointError(folder, f"{family} diffusers folder does not match: " + "; ".join(problems))
    text_encoder, text_ignored = _diffusers_text_encoder(folder, family, text_configs, variant, dtype=dtype,
                                                         device=device, mmap=mmap, copied=copied)  # fmt: skip
    check_sdxl_vector(family, unet_config, text_encoder, folder / "unet" / "config.json", "addition_time_embed_dim")
    notes = tuple(notes) + tokenizer_pad_notes(folder, family, text_encoder.encoders)
    unet = build_module(UNetModel, unet_config, parts["unet"], dtype=dtype, device=device, model=metas["unet"])
    vae = build_module(AutoencoderKL, vae_config, parts["vae"], dtype=dtype, device=device, model=metas["vae"])
    return LoadedModel(
        family=family, prediction=pred, text_encoder=text_encoder, unet=unet, vae=vae, unet_config=unet_config,
        vae_config=vae_config, metadata=metadata, ignored_keys=tuple(text_ignored), notes=notes, source=str(folder),
        copied_pickles=tuple(copied),
    )  # fmt: skip
