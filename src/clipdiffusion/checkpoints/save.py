"""Writing components back out: the LDM single-file layout, or a diffusers folder.

Single files use the prefixes every SD tool reads (UNet ``model.diffusion_model.``, VAE ``first_stage_model.``,
text encoders in the family's own layout via ``text_layouts.text_encoder_to_ldm``) and carry our metadata: the
family, the prediction type and every config as JSON, so that a file we wrote loads back with exactly the
hyperparameters it was made with, plus ModelSpec keys for other tools.

diffusers folders follow diffusers' conventions, including its lossy one for SD2: the text encoder keeps 23 of
OpenCLIP-H's 24 layers (SD2 conditions on the penultimate one) and drops the unused projection.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import CheckpointError, ClipDiffusionError
from ..families import EOS_ID, FAMILIES
from . import detect
from .build import config_to_json
from .safetensors_io import atomic_write, save_file

_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
              "set_alpha_to_one": False, "clip_sample": False}  # fmt: skip (checkpoints.md §7.4)


def _parts(model):
    """(family record, prediction, text encoder specs, unet, vae) from a LoadedModel, a Pipeline or alike."""
    try:
        family, prediction = model.family, model.prediction
        unet, vae, text = model.unet, model.vae, model.text_encoder
    except AttributeError as exc:
        raise ClipDiffusionError(f"model: needs family, prediction, unet, vae and text_encoder ({exc})") from None
    if not isinstance(family, str) or family not in FAMILIES:
        raise ClipDiffusionError(f"model.family must be one of {detect.FAMILIES}, got {family!r}")
    if prediction not in detect.PREDICTIONS:
        raise ClipDiffusionError(f"model.prediction must be one of {detect.PREDICTIONS}, got {prediction!r}")
    return FAMILIES[family], prediction, list(text.encoders), unet, vae


def _cast(tensors: dict, dtype) -> dict:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _written_text_config(spec):
    """The config of the tower as ``text_encoder_to_ldm`` writes it: a diffusers-style SD2 tower (its last layer
    removed) gets an identity block appended, so that LDM readers' "penultimate" is its last layer."""
    from .text_layouts import written_layers

    return dataclasses.replace(spec.model.config, layers=written_layers(spec))


def checkpoint_metadata(model, extra: dict | None = None) -> dict:
    family, prediction, encoders, unet, vae = _parts(model)
    meta = {
        detect.META_FAMILY: family.name,
        detect.META_PREDICTION: prediction,
        detect.META_UNET: config_to_json(unet.config),
        detect.META_VAE: config_to_json(vae.config),
        detect.META_TEXT: json.dumps([dataclasses.asdict(_written_text_config(e)) for e in encoders],
                                     separators=(",", ":")),  # fmt: skip
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        "format": "pt",
    }
    size = getattr(model, "default_size", None)
    if isinstance(size, int) and size > 0:
        meta["modelspec.resolution"] = f"{size}x{size}"
    arch = detect.modelspec_architecture(family.name, prediction)
    if arch:
        meta["modelspec.architecture"] = arch
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ClipDiffusionError(f"metadata: entry {k!r} must map a string to a string")
        meta[k] = v
    return meta


def checkpoint_state_dict(model) -> dict:
    """All tensors of a single-file LDM checkpoint, by their file names."""
    from .text_layouts import text_encoder_to_ldm

    family, _, encoders, unet, vae = _parts(model)
    out = {detect.UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    out.update({detect.VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    out.update(text_encoder_to_ldm(family, encoders))
    return out


def save_checkpoint(model, path, metadata: dict | None = None, *, dtype=None) -> Path:
    """Write ``model`` (LoadedModel, Pipeline, ...) as one LDM-layout .safetensors file with our metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ClipDiffusionError(f"path: single files are written as .safetensors only, got {str(path)!r}")
    save_file(_cast(checkpoint_state_dict(model), dtype), path, checkpoint_metadata(model, metadata))
    return path


# --- diffusers folders -------------------------------------------------------------------------------------


def _write_text(path: Path, text: str):
    """Through a private temporary file, as the weights are (safetensors_io.atomic_write): nothing planted in the
    folder under a predictable name is followed."""
    _mkdir(path.parent)
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _mkdir(folder: Path):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(folder, f"cannot create the folder: {exc.strerror or exc}") from None


def _write_json(path: Path, data: dict):
    _write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _hf_text_config(config, *, with_projection: bool) -> dict:
    """A transformers ``CLIPTextConfig`` dict for one of our towers."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size, "hidden_size": config.width, "intermediate_size": config.hidden_mlp,
        "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
        "max_position_embeddings": config.max_positions, "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps, "projection_dim": config.projection_dim or config.width,
        "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        # 49407 (not the legacy 2) makes transformers pool at the first EOS, as CLIP does.
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }  # fmt: skip


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> character table in vocabulary order (printable Latin-1 bytes stand for themselves,
    the other 68 bytes take U+0100 on), as in openai/CLIP's ``bytes_to_unicode``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def write_tokenizer(folder: Path, pad_token: str):
    """vocab.json + merges.txt in the transformers CLIPTokenizer format, built from our bundled BPE file
    (vocabulary: 256 byte symbols, the same with ``</w>``, one entry per merge, then the two special tokens)."""
    import gzip

    from ..text.tokenizer import DEFAULT_VOCAB, VOCAB_SIZE

    n_merges = VOCAB_SIZE - 512 - 2
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_merges + 1)][1:]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    pieces = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "errors": "replace",
    })  # fmt: skip
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    })  # fmt: skip


def save_diffusers(model, folder, *, dtype=None, tokenizer: bool = True, weights: bool = True) -> Path:
    """Write ``model`` as a diffusers pipeline folder that diffusers' ``from_pretrained`` reads offline.

    ``weights=False`` writes the configs only: the ``config=`` folder diffusers' ``from_single_file`` needs to
    read a single file offline."""
    from .diffusers_unet import unet_config_to_diffusers, unet_ldm_to_diffusers
    from .diffusers_vae import vae_config_to_diffusers, vae_ldm_to_diffusers
    from .text_layouts import DIFFUSERS_TEXT_FOLDERS, text_encoder_to_diffusers

    family, prediction, encoders, unet, vae = _parts(model)
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise CheckpointError(folder, "output exists and is not a folder")
        try:
            if any(folder.iterdir()):
                raise CheckpointError(folder, "output folder exists and is not empty")
        except OSError as exc:
            raise CheckpointError(folder, f"cannot read the output folder: {exc.strerror or exc}") from None
    native = family.native_size_for(prediction)
    xl = len(family.towers) == 2  # CLIP-L and bigG: diffusers' XL pipeline
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        detect.DIFFUSERS_FAMILY_KEY: family.name,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer else [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }  # fmt: skip
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"] if tokenizer else [None, None],
                     force_zeros_for_empty_prompt=family.zero_empty_negative)  # fmt: skip
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)

    unet_dir, vae_dir = folder / "unet", folder / "vae"
    _write_json(unet_dir / "config.json", unet_config_to_diffusers(unet.config, sample_size=native // 8))
    _write_json(vae_dir / "config.json", vae_config_to_diffusers(vae.config, sample_size=native))
    if weights:
        unet_sd = unet_ldm_to_diffusers(dict(unet.state_dict()), unet.config)
        save_file(_cast(unet_sd, dtype), unet_dir / "diffusion_pytorch_model.safetensors")
        vae_sd = vae_ldm_to_diffusers(dict(vae.state_dict()), vae.config)
        save_file(_cast(vae_sd, dtype), vae_dir / "diffusion_pytorch_model.safetensors")

    # SD2 conditions on the penultimate layer; diffusers' convention drops the last one instead (unless the tower
    # came from such a folder and lacks it already): text_encoder_to_diffusers follows it.
    for sub, tensors, config in text_encoder_to_diffusers(family, encoders):
        with_projection = sub != DIFFUSERS_TEXT_FOLDERS[0]
        _write_json(folder / sub / "config.json", _hf_text_config(config, with_projection=with_projection))
        if weights:
            save_file(_cast(tensors, dtype), folder / sub / "model.safetensors")
    if tokenizer:
        # each tokenizer pads as its tower's recipe says: EOS (CLIP-L) or id 0, which is "!" (OpenCLIP)
        for sub, recipe in zip(("tokenizer", "tokenizer_2"), family.towers):
            write_tokenizer(folder / sub, "<|endoftext|>" if recipe.pad_id == EOS_ID else "!")
    scheduler = dict(_SCHEDULER, _class_name="EulerDiscreteScheduler",
                     prediction_type="v_prediction" if prediction == "v" else "epsilon")  # fmt: skip
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(folder / "model_index.json", index)
    return folder
