"""LoRA files: reading, validating and mapping their keys onto our parameter names. No application here (that is
``clipdiffusion.lora``).

Layouts (``shared/reference/prompt-language-and-networks.md`` section 5):

- **kohya / A1111**: ``<module>.lora_down.weight`` [r, in(, kh, kw)], ``<module>.lora_up.weight`` [out, r(, 1, 1)],
  optional ``<module>.alpha`` (0-d) and ``<module>.lora_mid.weight`` [r, r, kh, kw] (LoCon CP/Tucker). Module names
  are ``lora_unet_<path>`` / ``lora_te_<path>`` / ``lora_te1_`` / ``lora_te2_`` with every ``.`` of the module path
  written ``_``. UNet paths are diffusers paths (kohya SD1/SD2) or LDM paths (kohya SDXL): both are accepted for any
  model. Text paths are transformers CLIP paths (``text_model.encoder.layers.3.self_attn.q_proj``).
- **diffusers / PEFT**: ``<module>.lora_A.weight`` (down), ``<module>.lora_B.weight`` (up), optional
  ``<module>.alpha``, modules ``unet.<diffusers path>``, ``text_encoder.<HF path>``, ``text_encoder_2.<HF path>``.

Scale = alpha / rank, where a missing alpha or an alpha of 0 counts as the rank (scale 1), as in kohya, A1111,
ComfyUI and PEFT. Text towers are addressed by their index in ``TextEncoder.encoders``: one tower takes ``lora_te``
/ ``text_encoder``; several take ``lora_te1``, ``lora_te2``, ... / ``text_encoder``, ``text_encoder_2``, ...

A LoRA file is untrusted input: safetensors only (``safetensors_io`` validates the header before anything is
allocated; pickled ``.pt``/``.ckpt`` LoRAs are refused), floating tensors only, every value finite, up and down
present with matching ranks >= 1, and every module must address one of the model's Linear/Conv2d weights with
fitting shapes. Anything else is a ``CheckpointError`` naming the file and the reason; keys that match nothing in
the model are listed (strict, like checkpoints), never dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

LORA_SUFFIX = ".safetensors"
MAX_LISTED = 20  # keys named in one error message
UNET = "unet"

_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_mid\.weight|lora_A\.weight|"
                   r"lora_B\.weight|alpha)$")
_PART_NAMES = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
               "lora_mid.weight": "mid", "alpha": "alpha"}
# key pieces of adapter types we do not implement, so the error can say what the file is
_OTHER_TYPES = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "oft_": "OFT", "diff": "full diff",
                "w_norm": "norm", "b_norm": "norm", "a1.weight": "GLoRA", "on_input": "IA3"}


def te_component(index: int) -> str:
    """The component name of text tower ``index`` (its position in ``TextEncoder.encoders``)."""
    return f"te{index}"


def is_text_component(component: str) -> bool:
    return component != UNET


@dataclass(frozen=True)
class LoraModule:
    """One module of a file, validated on its own: ``down`` [r, in(, kh, kw)], ``up`` [out, r(, 1, 1)], ``mid``
    [r, r, kh, kw] or None, ``alpha`` (float or None), ``key`` the module name as the file spells it."""

    key: str
    down: object
    up: object
    mid: object = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank; a missing or zero alpha counts as the rank (scale 1)."""
        if self.alpha is None or self.alpha == 0:
            return 1.0
        return self.alpha / self.rank


@dataclass(frozen=True, eq=False)  # compared by identity: an applied set holds the very files it applied
class LoraFile:
    """A read and validated file: its modules by file module name, the safetensors ``__metadata__`` and the
    layout ("kohya", "peft" or "mixed")."""

    path: str
    modules: dict
    metadata: dict
    layout: str


@dataclass(frozen=True)
class LoraTarget:
    """Where a module lands: ``component`` ("unet" or "te<i>"), our parameter name (``....weight``) and its
    shape."""

    component: str
    parameter: str
    shape: tuple


def _floats(path, name, tensor):
    import torch

    if not tensor.is_floating_point():
        raise CheckpointError(path, f"LoRA tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                                    "LoRA factors must be floating point")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(path, f"LoRA tensor {name!r} has {bad} non-finite values (NaN/Inf) of {tensor.numel()}")
    return tensor


def _unsupported(path, keys):
    kinds = sorted({kind for key in keys for piece, kind in _OTHER_TYPES.items() if piece in key.rsplit(".", 2)[-2:]
                    or key.rsplit(".", 1)[-1].startswith(piece)})
    what = f" ({', '.join(kinds)} adapters are not supported: only LoRA/LoCon up/down[/mid] factors)" if kinds else ""
    shown = ", ".join(keys[:MAX_LISTED]) + (f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")
    return CheckpointError(path, f"{len(keys)} keys are not LoRA factors{what}: {shown}")


def read_lora(path) -> LoraFile:
    """Read and validate a LoRA file (safetensors only). Model-independent checks: tensor kinds, dtypes,
    finiteness, up/down pairs, ranks, alpha shapes. ``map_lora`` checks it against a model."""
    from .safetensors_io import is_pickle_path, load_file, read_header

    path = Path(path)
    if is_pickle_path(path) or path.suffix.lower() != LORA_SUFFIX:
        raise CheckpointError(path, f"LoRA files must be {LORA_SUFFIX} (pickled .pt/.ckpt LoRAs are refused: "
                                    "convert them to safetensors)")
    header = read_header(path)
    if not header.tensors:
        raise CheckpointError(path, "the LoRA file holds no tensors")
    tensors = load_file(path)
    parts, unknown = {}, []
    for key in sorted(tensors):
        m = _PART.match(key)
        if m is None:
            unknown.append(key)
            continue
        parts.setdefault(m.group("module"), {})[_PART_NAMES[m.group("part")]] = (key, m.group("part"))
    if unknown:
        raise _unsupported(path, unknown)
    modules, layouts = {}, set()
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise CheckpointError(path, f"LoRA module {module!r} has no {missing} factor (found: "
                                        f"{', '.join(key for key, _ in found.values())})")
        layouts.add("peft" if found["down"][1] == "lora_A.weight" else "kohya")
        if found["up"][1].startswith("lora_B") != found["down"][1].startswith("lora_A"):
            raise CheckpointError(path, f"LoRA module {module!r} mixes kohya and PEFT factor names")
        down = _floats(path, found["down"][0], tensors[found["down"][0]])
        up = _floats(path, found["up"][0], tensors[found["up"][0]])
        mid = _floats(path, found["mid"][0], tensors[found["mid"][0]]) if "mid" in found else None
        alpha = None
        if "alpha" in found:
            a = _floats(path, found["alpha"][0], tensors[found["alpha"][0]])
            if a.numel() != 1:
                raise CheckpointError(path, f"LoRA alpha {found['alpha'][0]!r} has shape {tuple(a.shape)}; "
                                            "expected one value")
            alpha = float(a.reshape(()))
        _check_factors(path, module, down, up, mid)
        modules[module] = LoraModule(module, down, up, mid, alpha)
    metadata = parse_metadata(header.metadata)
    return LoraFile(str(path), modules, metadata, layouts.pop() if len(layouts) == 1 else "mixed")


def _check_factors(path, module, down, up, mid):
    def fail(reason):
        raise CheckpointError(path, f"LoRA module {module!r}: {reason} (down {tuple(down.shape)}, up "
                                    f"{tuple(up.shape)}{'' if mid is None else f', mid {tuple(mid.shape)}'})")

    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        fail("down and up must be 2-D (Linear) or 4-D (Conv2d)")
    rank = down.shape[0]
    if rank < 1 or min(down.shape) < 1 or min(up.shape) < 1:
        fail("rank 0 or an empty dimension")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        fail("a conv up factor must be 1x1")
    if mid is None:
        if up.shape[1] != rank:
            fail(f"up has {up.shape[1]} ranks, down {rank}")
        return
    if mid.ndim != 4 or down.ndim != 4 or tuple(down.shape[2:]) != (1, 1):
        fail("a lora_mid (CP) module needs 4-D mid and 1x1 conv down/up factors")
    if mid.shape[1] != rank or up.shape[1] != mid.shape[0]:
        fail("the ranks of up, mid and down do not chain")


def parse_metadata(metadata: dict) -> dict:
    """safetensors ``__metadata__`` with JSON-looking strings (``{...}``, ``[...]``) parsed, as A1111's
    ``/sdapi/v1/loras`` returns it."""
    out = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, str) and value[:1] in "{[" and value[-1:] in "}]":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


# ---- mapping onto a model ---------------------------------------------------------------------------------------


def _us(path: str) -> str:
    return path.replace(".", "_")


@dataclass(frozen=True)
class LoraTargets:
    """Every name a LoRA module may use for each of a model's Linear/Conv2d weights -> ``LoraTarget``."""

    names: dict
    towers: int

    def __len__(self):
        return len(self.names)


def lora_targets(unet, text_models, *, unet_config=None) -> LoraTargets:
    """The lookup for a model: ``unet`` (our LDM-named UNetModel, or None), ``text_models`` (the towers' CLIPTextModel
    in ``TextEncoder.encoders`` order). UNet modules answer to ``lora_unet_<LDM path>``, ``lora_unet_<diffusers
    path>`` and ``unet.<diffusers path>`` (``unet_block_table`` renames); tower i to ``lora_te[i+1]_text_model_<HF
    path>`` and ``text_encoder[_i+1].text_model.<HF path>`` (also without ``text_model``)."""
    import torch

    names = {}

    def add(name, target):
        previous = names.setdefault(name, target)
        if previous != target:
            raise CheckpointError("LoRA targets", f"{name!r} names both {previous.parameter} and {target.parameter}")

    def modules(model):
        for path, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                yield path, tuple(module.weight.shape)

    if unet is not None:
        from .diffusers_unet import unet_ldm_to_diffusers

        config = unet_config if unet_config is not None else unet.config
        for path, shape in modules(unet):
            target = LoraTarget(UNET, f"{path}.weight", shape)
            add(f"lora_unet_{_us(path)}", target)
            try:  # one key at a time through the rename table (a meta tensor: names only, nothing allocated)
                (diff,) = unet_ldm_to_diffusers({target.parameter: torch.empty(shape, device="meta")}, config)
            except CheckpointError:
                continue  # no diffusers name: reachable by its LDM name only
            diff = diff[: -len(".weight")]
            add(f"lora_unet_{_us(diff)}", target)
            add(f"unet.{diff}", target)
    count = len(text_models)
    for i, model in enumerate(text_models):
        kohya = "lora_te" if count == 1 else f"lora_te{i + 1}"
        peft = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        for path, shape in modules(model):
            target = LoraTarget(te_component(i), f"{path}.weight", shape)
            add(f"{kohya}_text_model_{_us(path)}", target)
            add(f"{kohya}_{_us(path)}", target)
            add(f"{peft}.text_model.{path}", target)
            add(f"{peft}.{path}", target)
    return LoraTargets(names, count)


@dataclass(frozen=True)
class LoraWeight:
    """One validated module on its target: ``up`` [out, r'] and ``down`` [r, in*kh*kw] as 2-D views, ``mid``
    [r', r, kh, kw] or None, ``scale`` alpha/rank, ``shape`` the target weight's shape."""

    target: LoraTarget
    up: object
    down: object
    mid: object
    scale: float
    key: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def map_lora(lora: LoraFile, targets: LoraTargets) -> dict:
    """``{(component, parameter): [LoraWeight, ...]}`` for ``lora`` on a model. Module names that match nothing,
    and factors whose shapes do not fit their target weight, are a ``CheckpointError`` listing them."""
    out, unknown = {}, []
    for key, module in lora.modules.items():
        target = targets.names.get(key)
        if target is None:
            unknown.append(key)
            continue
        weight = _fit(lora.path, module, target)
        out.setdefault((target.component, target.parameter), []).append(weight)
    if unknown:
        shown = ", ".join(unknown[:MAX_LISTED]) + (f" (+{len(unknown) - MAX_LISTED} more)"
                                                   if len(unknown) > MAX_LISTED else "")
        towers = f"{targets.towers} text tower{'s' if targets.towers != 1 else ''}"
        raise CheckpointError(lora.path, f"{len(unknown)} LoRA modules match nothing in this model (UNet and "
                                         f"{towers}): {shown}")
    if not out:
        raise CheckpointError(lora.path, "the LoRA file has no modules")
    return out


def _fit(path, module: LoraModule, target: LoraTarget) -> LoraWeight:
    shape = target.shape
    out_ch, in_ch = shape[0], shape[1]
    kernel = tuple(shape[2:]) if len(shape) == 4 else (1, 1)
    down, up, mid = module.down, module.up, module.mid
    expected_in = in_ch * (kernel[0] * kernel[1] if mid is None else 1)

    def fail(reason):
        raise CheckpointError(path, f"LoRA module {module.key!r} does not fit {target.parameter} "
                                    f"{list(shape)}: {reason} (down {list(down.shape)}, up {list(up.shape)}"
                                    f"{'' if mid is None else f', mid {list(mid.shape)}'})")

    if up.shape[0] != out_ch:
        fail(f"up gives {up.shape[0]} outputs")
    if down.ndim == 2:
        if kernel != (1, 1) or down.shape[1] != in_ch:
            fail("down does not take the weight's inputs")
    elif down.shape[1] != in_ch or (mid is None and tuple(down.shape[2:]) != kernel):
        fail("down does not take the weight's inputs and kernel")
    if mid is not None and (len(shape) != 4 or tuple(mid.shape[2:]) != kernel):
        fail("mid's kernel is not the weight's")
    down2 = down.reshape(down.shape[0], -1)
    if down2.shape[1] != expected_in:
        fail("down does not take the weight's inputs")
    return LoraWeight(target, up.reshape(up.shape[0], -1), down2, mid, module.scale, module.key)


def lora_delta(weight: LoraWeight, multiplier: float, *, dyn: int | None = None, device=None):
    """ΔW in float32 with the target's shape: multiplier * scale * up @ down (reshaped to the conv kernel; with a
    ``mid``, the CP product up[o,a] mid[a,b,k,l] down[b,i]). ``dyn`` keeps the first ranks only (A1111's
    ``<lora:x:1:1:dyn>``); the scale stays alpha over the full rank."""
    import torch

    device = weight.up.device if device is None else device
    up, down, mid = weight.up.to(device).float(), weight.down.to(device).float(), weight.mid
    if dyn is not None:
        up, down = up[:, :dyn], down[:dyn]
        mid = None if mid is None else mid[:dyn, :dyn]
    factor = multiplier * weight.scale
    if mid is None:
        delta = up @ down
    else:
        delta = torch.einsum("oa,abkl,bi->oikl", up, mid.to(device).float(), down)
    return (delta * factor).reshape(weight.target.shape)


def add_delta(target, weight: LoraWeight, multiplier: float, *, dyn: int | None = None) -> None:
    """``target`` (a float32 tensor of the weight's shape, changed in place) += the delta of ``lora_delta``, as one
    fused ``addmm_`` on its [out, in*kh*kw] view when there is no ``mid`` (no full-size temporary)."""
    if weight.mid is not None:
        target += lora_delta(weight, multiplier, dyn=dyn, device=target.device)
        return
    up, down = weight.up.to(target.device).float(), weight.down.to(target.device).float()
    if dyn is not None:
        up, down = up[:, :dyn], down[:dyn]
    target.view(target.shape[0], -1).addmm_(up, down, alpha=multiplier * weight.scale)
