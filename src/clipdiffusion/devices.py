"""Where a model runs and in which precision: ``resolve(device, dtype, *, family=None) -> Placement``.

Torch-light: names are plain strings ("cpu", "cuda:0"; "fp32", "bf16", "fp16"); torch is imported only to ask
about CUDA (``device`` "auto" or "cuda[:n]") and by ``Placement.torch_dtype``.

What ``auto`` picks, per machine (issue 19):
- a CUDA GPU when one is visible: UNet and text encoder in fp16; the VAE in fp16 too, except for families whose
  VAE overflows in fp16 (the family record's ``vae_fp16_overflows``: SDXL's VAE gives Inf/NaN in fp16, hence
  diffusers' ``force_upcast`` and the community "fp16-fix" VAE), whose VAE runs in bf16, or fp32 on a GPU without
  bf16. The rule also applies to an explicit ``fp16``.
- else the CPU, in bf16 when it has native bf16 matrix units (x86 flags ``amx_bf16`` or ``avx512_bf16`` in
  /proc/cpuinfo, or ``lscpu`` where /proc is absent): UNet and VAE in bf16, the text encoder in fp32 (it runs
  once per image, so bf16 would buy nothing there). An AVX2-only CPU (the AMD EPYC this was built on) emulates
  bf16 with conversions, slower than fp32: it gets fp32. Other architectures are not probed (fp32).
- ``fp16`` on the CPU is allowed (torch runs it, slowly: no CPU has fp16 matrix units that torch uses), with a
  note saying so; ``bf16`` on a CPU without bf16 units likewise.

Precision-sensitive parts stay fp32 whatever the placement (see ``diffusion/``): GroupNorm statistics
(``GroupNorm32`` upcasts), the explicit attention softmax (fp32 scores), the timestep embedding, the sampler's
latents and sigmas (the denoiser casts the UNet input to the UNet's dtype and its output back), the initial noise
(drawn in fp32 on the CPU generator, so a seed gives the same noise on every device and dtype) and the VAE's
posterior noise. torch's LayerNorm on bf16/fp16 input accumulates its statistics in fp32 on CPU and CUDA (its
"acc type"), and its fused SDPA kernels accumulate in fp32 as well.

The library, CLI and server default to ``cpu``/``fp32`` (``DEFAULT_DEVICE``, ``DEFAULT_DTYPE``): ``auto`` is
asked for, not assumed, until the adherence check of issue 19 shows it within 0.02 of fp32.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import ClipDiffusionError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # as shown in messages
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "fp32"
_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", "auto": "auto"}  # fmt: skip
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of native bf16 matrix units (AMX tiles, AVX512-BF16)
CPUINFO_PATH = "/proc/cpuinfo"


@dataclass(frozen=True)
class Placement:
    """The resolved device ("cpu" | "cuda:N") and each component's dtype ("fp32" | "bf16" | "fp16"), with the
    reason in words (what was asked, what was picked and why)."""

    device: str
    unet_dtype: str
    text_dtype: str
    vae_dtype: str
    reason: str

    @property
    def uniform(self) -> bool:
        return self.unet_dtype == self.text_dtype == self.vae_dtype

    @property
    def is_default(self) -> bool:
        """cpu and fp32 everywhere: how clipdiffusion ran before placements existed."""
        return self.device == "cpu" and self.uniform and self.unet_dtype == "fp32"

    def torch_dtype(self, component: str):
        """``component`` "unet" | "text" | "vae" -> its torch dtype."""
        import torch

        return getattr(torch, _TORCH_NAMES[getattr(self, f"{component}_dtype")])

    def describe(self) -> str:
        """One line: ``cpu UNet bf16, text encoder fp32, VAE bf16 (auto: ...)``."""
        if self.uniform:
            dtypes = f"{self.unet_dtype}"
        else:
            dtypes = f"UNet {self.unet_dtype}, text encoder {self.text_dtype}, VAE {self.vae_dtype}"
        return f"{self.device} {dtypes} ({self.reason})"

    def to_dict(self) -> dict:
        return {"device": self.device, "unet_dtype": self.unet_dtype, "text_dtype": self.text_dtype,
                "vae_dtype": self.vae_dtype, "reason": self.reason}  # fmt: skip


def check_dtype(dtype, field: str = "dtype") -> str:
    """A dtype request ("auto", "fp32", "bf16", "fp16", their torch names, or a floating torch.dtype of those)
    -> its short name, or a ClipDiffusionError naming the field and the value."""
    name = dtype
    if not isinstance(dtype, str):
        name = str(dtype).removeprefix("torch.") if type(dtype).__name__ == "dtype" else None
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ClipDiffusionError(f"{field}={dtype!r}: choose from {', '.join(DTYPES)}")
    return _ALIASES[key]


def check_device(device, field: str = "device") -> str:
    """A device request -> "auto" | "cpu" | "cuda:N" ("cuda" is "cuda:0"), without asking torch anything; other
    values (mps, xpu, "gpu", a bad index) are a ClipDiffusionError naming the field and the value."""
    text = str(device).strip().lower() if isinstance(device, str) or type(device).__name__ == "device" else None
    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::(\d{1,3}))?", text or "")
    if match is None:
        raise ClipDiffusionError(f"{field}={device!r}: choose from auto, cpu, cuda, cuda:N (N = the GPU's index)")
    return f"cuda:{int(match.group(1) or 0)}"


@functools.lru_cache(maxsize=8)
def _cpu_flags_from(path: str) -> frozenset:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(4_000_000)
    except OSError:
        return _lscpu_flags()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 "flags"; aarch64 "Features" (read, not probed for bf16)
            return frozenset(value.split())
    return frozenset()


def _lscpu_flags() -> frozenset:
    exe = shutil.which("lscpu")
    if exe is None:
        return frozenset()
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Flags":
            return frozenset(value.split())
    return frozenset()


def cpu_flags() -> frozenset:
    """The CPU's feature flags (first processor of ``CPUINFO_PATH``; ``lscpu`` when that cannot be read)."""
    return _cpu_flags_from(CPUINFO_PATH)


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 matrix units?, which flags say so / that none do)."""
    found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"CPU flag {' and '.join(found)}"
    return False, f"no {' or '.join(CPU_BF16_FLAGS)} CPU flag"


def _cuda():
    """(GPU count, bf16 supported on the first) from torch, (0, False) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, False
    try:
        count = torch.cuda.device_count()
    except RuntimeError:
        count = 0
    try:
        bf16 = bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):
        bf16 = False
    return max(count, 1), bf16


def resolve(device="auto", dtype="auto", *, family=None) -> Placement:
    """The placement for a ``device`` ("auto" | "cpu" | "cuda" | "cuda:N") and ``dtype`` ("auto" | "fp32" | "bf16"
    | "fp16") request; ``family`` (a ``families`` name or record) applies its ``vae_fp16_overflows`` rule. Errors
    name the field and value: an unknown value, ``cuda`` without a GPU, an index past the GPUs there are."""
    dev = check_device(device)
    want = check_dtype(dtype)
    record = None
    if family is not None:
        from .families import get_family

        record = get_family(family)
    notes = []
    gpus, gpu_bf16 = (0, False) if dev == "cpu" else _cuda()
    if dev == "auto":
        dev = "cuda:0" if gpus else "cpu"
        notes.append("auto: a CUDA GPU is here" if gpus else "auto: no CUDA GPU, so the CPU")
    elif dev.startswith("cuda"):
        index = int(dev.split(":")[1])
        if not gpus:
            raise ClipDiffusionError(f"device={device!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                                     "is False); use cpu or auto")  # fmt: skip
        if index >= gpus:
            raise ClipDiffusionError(f"device={device!r}: there are {gpus} CUDA GPUs here (cuda:0..cuda:{gpus - 1})")
    on_gpu = dev.startswith("cuda")

    if want == "auto":
        if on_gpu:
            unet = text = vae = "fp16"
            notes.append("auto: fp16 on a GPU")
        else:
            native, why = cpu_bf16()
            if native:
                unet, text, vae = "bf16", "fp32", "bf16"
                notes.append(f"auto: bf16 UNet and VAE on the CPU's native bf16 matrix units, {why}; fp32 text encoder")
            else:
                unet = text = vae = "fp32"
                notes.append(f"auto: fp32, {why}, so bf16 would be emulated and slower")
    else:
        unet = text = vae = want
        if not on_gpu and want == "fp16":
            notes.append("fp16 on the CPU works but is slow, with no fp16 matrix units; bf16 or fp32 is faster")
        elif not on_gpu and want == "bf16" and not cpu_bf16()[0]:
            notes.append(f"bf16 as asked, but {cpu_bf16()[1]}, so bf16 is emulated and slower than fp32")
    if vae == "fp16" and on_gpu and record is not None and record.vae_fp16_overflows:
        vae = "bf16" if gpu_bf16 else "fp32"
        notes.append(f"the {record.name} VAE overflows in fp16, so it runs in {vae}")
    if not notes:
        notes.append("as asked")
    return Placement(dev, unet, text, vae, "; ".join(notes))


def family_sensitive(placement: Placement) -> bool:
    """Whether a family's record could change this placement (the fp16 VAE rule): loaders that must choose
    dtypes before the family is known load such models first and place them after."""
    return placement.device.startswith("cuda") and placement.vae_dtype == "fp16"


def place_modules(placement: Placement, *, text_encoder=None, unet=None, vae=None) -> None:
    """Move each given component to the placement's device and its own dtype (in place)."""
    if unet is not None:
        unet.to(device=placement.device, dtype=placement.torch_dtype("unet"))
    if vae is not None:
        vae.to(device=placement.device, dtype=placement.torch_dtype("vae"))
    if text_encoder is not None:
        text_encoder.to(device=placement.device, dtype=placement.torch_dtype("text"))


# ---- the command line (generate, serve, eval): the commands call these; the flags mean the same everywhere ------

def add_arguments(parser) -> None:
    """``--device``, ``--dtype`` (defaults cpu/fp32; validated by ``from_args``) and the loading options
    (``--mmap``: ``load_options``) on an argparse parser."""
    parser.add_argument("--device", default=DEFAULT_DEVICE, metavar="auto|cpu|cuda[:N]",
                        help="where the model runs (default %(default)s); auto: a CUDA GPU when there is one, "
                             "else the CPU")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, metavar="auto|fp32|bf16|fp16",
                        help="weights' precision (default %(default)s); auto: fp16 on a GPU (the SDXL VAE in bf16), "
                             "bf16 on a CPU with bf16 matrix units (AMX or AVX512-BF16; text encoder fp32), else fp32")
    parser.add_argument("--mmap", action="store_true",
                        help="map the model's .safetensors files instead of copying them (faster start, one copy in "
                             "memory; only weights kept in their stored dtype on the CPU stay mapped; pickled "
                             ".ckpt/.bin files are copied). Risk: the file must not change while the model is "
                             "loaded: truncated, the process dies with SIGBUS; rewritten in place, the weights "
                             "change. Mapped pages count toward RSS once touched")
    parser.add_argument("--compile", default="off", metavar="off|unet|vae|unet+vae",
                        help="run the UNet (and/or the VAE decoder) through torch.compile (default %(default)s): the "
                             "first call of each image size and prompt length compiles, minutes on a CPU for SD 1.5, "
                             "then each step is faster; a failed compilation runs eagerly with a note")


def load_options(args) -> dict:
    """The model-loading keywords of parsed arguments for ``Pipeline.from_*`` (``--mmap``, ``--compile``, checked
    here: errors name the flag): only those that are not the default, so a loader that predates them is called as
    before."""
    from .diffusion.compiled import check_targets

    options = {"mmap": True} if getattr(args, "mmap", False) else {}
    targets = check_targets(getattr(args, "compile", "off"), "--compile")
    return options if targets == "off" else {**options, "compile": targets}


def from_args(args) -> tuple[str, str]:
    """(device, dtype) of parsed ``--device``/``--dtype``, each checked (errors name the flag and the value)."""
    device = check_device(getattr(args, "device", DEFAULT_DEVICE), "--device")
    dtype = check_dtype(getattr(args, "dtype", DEFAULT_DTYPE), "--dtype")
    return device, dtype
