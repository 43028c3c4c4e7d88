"""The request's options for fewer and cheaper UNet evaluations (issue 19), put to work for one sampling run.

Each is a ``GenerationRequest`` field, off by default, with A1111's name where A1111 has the option (``SPEEDS``
names presets of them: ``generate`` and ``batch`` default to ``fast``, everything else to ``exact``):

- ``s_min_uncond`` (+ ``s_min_uncond_all``): A1111's NGMS, "Negative Guidance minimum sigma"; ``skip_early_cond``:
  A1111's "Skip Early CFG". Both drop the uncond pass on some calls (``diffusion.scheduled.UncondSkip``).
- ``deepcache_interval``: DeepCache (``diffusion.deepcache``), the whole UNet every N steps.
- ``token_merging_ratio``: ToMe for SD (``diffusion.tome``), seeded by the request's seed.

Infotext keys (``INFOTEXT_KEYS``): A1111's "NGMS", "NGMS all steps", "Skip Early CFG", "Token merging ratio"; ours
"DeepCache interval" (A1111 has no DeepCache). A conditioning cache across requests is
``text.cond_cache`` (``Pipeline.enable_conditioning_cache``): it changes no image, so it is no request field.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from .request import RequestError

# request field -> (A1111 infotext key, text -> value); written when not the default
INFOTEXT_KEYS = {
    "s_min_uncond": ("NGMS", float),
    "s_min_uncond_all": ("NGMS all steps", lambda text: str(text).strip().lower() == "true"),
    "skip_early_cond": ("Skip Early CFG", float),
    "token_merging_ratio": ("Token merging ratio", float),
    "deepcache_interval": ("DeepCache interval", int),
}
FIELDS = tuple(INFOTEXT_KEYS)


def uncond_skip(request):
    """The ``UncondSkip`` rule of ``request`` (None when NGMS and Skip Early CFG are both off)."""
    from .diffusion.scheduled import UncondSkip, schedule_steps

    rule = UncondSkip(total=schedule_steps(request.sampler, request.steps), s_min_uncond=request.s_min_uncond,
                      s_min_uncond_all=request.s_min_uncond_all, skip_early_cond=request.skip_early_cond)
    return rule if rule.active else None


def denoiser_options(request) -> dict:
    """Keywords for ``ScheduledConditioning.denoiser``: ``{"skip": UncondSkip}`` when NGMS or Skip Early CFG is
    on, else none (the call is then exactly what it was before these options existed)."""
    skip = uncond_skip(request)
    return {} if skip is None else {"skip": skip}


def wrap_unet(unet, request):
    """``unet``, or a ``DeepCacheUNet`` around it when ``request.deepcache_interval`` > 1."""
    if request.deepcache_interval <= 1:
        return unet
    from .diffusion.deepcache import DeepCacheUNet

    if not hasattr(unet, "forward_split"):
        raise RequestError("deepcache_interval", request.deepcache_interval,
                           f"DeepCache needs a plain UNet; this model runs a {type(unet).__name__}")
    return DeepCacheUNet(unet, request.deepcache_interval)


def token_merging(unet, request):
    """A context in which ``unet`` merges tokens as ``request.token_merging_ratio`` asks (nothing when 0)."""
    if not request.token_merging_ratio:
        return nullcontext()
    from .diffusion.tome import token_merging as merging

    return merging(unet, request.token_merging_ratio, seed=request.seed)


@contextmanager
def sampling(unet, request):
    """``with sampling(unet, request) as model:`` the UNet to sample with (DeepCache when asked), token merging on
    while the block runs."""
    with token_merging(unet, request):
        yield wrap_unet(unet, request)


def infotext_pairs(request) -> dict:
    """{infotext key: value} for the options that are on."""
    out = {}
    for name, (key, _) in INFOTEXT_KEYS.items():
        value = getattr(request, name)
        if value not in (0, 0.0, False):
            out[key] = value
    return out


def from_infotext_extra(extra: dict) -> dict:
    """{request field: value} from an infotext's ``extra`` pairs; RequestError naming the field when unreadable."""
    out = {}
    for name, (key, convert) in INFOTEXT_KEYS.items():
        if key in extra:
            try:
                out[name] = convert(extra[key])
            except ValueError:
                raise RequestError(name, extra[key], f"infotext {key!r} is not a valid value") from None
    return out


# -- speed presets ----------------------------------------------------------------------------------------------

# name -> request fields. "fast" holds what cost no measurable adherence on the tiny model (300 held-out prompts,
# paired against exact sampling) and roughly halves a 20-step SD 1.5 generation (bench/RESULTS.md): DeepCache every
# 2nd step, and NGMS at sigma 2 on every call below it. (A1111's every-other-call NGMS skips the calls DeepCache
# already makes shallow, so with DeepCache 2 it saves nothing: 262 s against 263 s at SD 1.5 size.) "exact" is
# sampling as diffusers and A1111 do it.
SPEEDS = {
    "exact": {},
    "fast": {"s_min_uncond": 2.0, "s_min_uncond_all": True, "deepcache_interval": 2},
}
CLI_SPEED = "fast"  # generate and batch; eval, serve and the Python API default to "exact"


def preset(speed: str) -> dict:
    """The request fields of a speed preset; an unknown name is an error naming ``speed``."""
    if speed not in SPEEDS:
        raise RequestError("speed", speed, f"choose from {', '.join(SPEEDS)}")
    return dict(SPEEDS[speed])


# -- the command line (generate, batch, eval) ---------------------------------------------------------------------

_FLAGS = {"s_min_uncond": "s_min_uncond", "s_min_uncond_all": "s_min_uncond_all", "skip_early_cond": "skip_early_cfg",
          "deepcache_interval": "deepcache", "token_merging_ratio": "tome"}  # request field -> argparse dest


def add_arguments(parser, speed: str = "exact") -> None:
    """``--speed``, and ``--s-min-uncond``, ``--s-min-uncond-all``, ``--skip-early-cfg``, ``--deepcache``, ``--tome``,
    each of which overrides the preset's value for its field. ``speed``: this command's default preset."""
    fast = ", ".join(f"{k}={v}" for k, v in SPEEDS["fast"].items())
    group = parser.add_argument_group(
        "speed: fewer or cheaper UNet evaluations",
        f"--speed fast = {fast} (NGMS 2 on all steps + DeepCache 2: about half the time at SD 1.5 size, "
        "adherence within noise on the tiny model); --speed exact = sampling as diffusers and A1111 do it. A flag below overrides the "
        "preset's value for its field.")
    group.add_argument("--speed", choices=list(SPEEDS), default=speed,
                       help=f"preset (default here: {speed}); the image's infotext records the options used")
    group.add_argument("--exact", dest="speed", action="store_const", const="exact",
                       help="the same as --speed exact")
    group.add_argument("--s-min-uncond", type=float, default=None, metavar="SIGMA",
                       help="A1111's NGMS: skip the negative prompt's pass on every other step while sigma < SIGMA "
                            "(0: off)")
    group.add_argument("--s-min-uncond-all", action="store_true", default=None,
                       help="with --s-min-uncond: skip it on every such step, not every other one")
    group.add_argument("--skip-early-cfg", type=float, default=None, metavar="F",
                       help="A1111's Skip Early CFG: no guidance (prompt only) for the first fraction F of steps")
    group.add_argument("--deepcache", type=int, default=None, metavar="N",
                       help="DeepCache: the whole UNet every N steps, only its shallow blocks in between (0: off)")
    group.add_argument("--tome", type=float, default=None, metavar="R",
                       help="ToMe for SD: merge this share of image tokens before self-attention (A1111's token "
                            "merging ratio; 0: off)")


def request_fields(args) -> dict:
    """The request fields of ``--speed`` and the flags (a flag given wins over the preset; values are checked when
    the request is built). Every field is present."""
    from .request import DEFAULTS

    fields = {name: DEFAULTS[name] for name in _FLAGS}
    fields.update(preset(getattr(args, "speed", None) or "exact"))
    for name, dest in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            fields[name] = value
    if not fields["s_min_uncond"] and getattr(args, "s_min_uncond_all", None) is None:
        fields["s_min_uncond_all"] = DEFAULTS["s_min_uncond_all"]  # the preset's "all steps" means nothing then
    return fields


def changed(fields: dict) -> dict:
    """Only the fields that are not off."""
    from .request import DEFAULTS

    return {k: v for k, v in fields.items() if v != DEFAULTS[k]}


class WithOptions:
    """A pipeline whose keyword ``generate(prompt, ...)`` adds these request fields (the eval studies call the
    keyword form)."""

    def __init__(self, pipe, fields: dict):
        from .request import GenerationRequest

        GenerationRequest.create(**fields)  # bad values fail here, naming the field
        self._pipe = pipe
        self._fields = dict(fields)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompt, negative_prompt="", **fields):
        from .request import GenerationRequest

        return self._pipe.generate(GenerationRequest.create(prompt=prompt, negative_prompt=negative_prompt,
                                                            **fields, **self._fields))


def with_options(pipe, fields: dict):
    """``pipe`` itself when every field is off, else a ``WithOptions`` around it."""
    fields = changed(fields)
    return WithOptions(pipe, fields) if fields else pipe
