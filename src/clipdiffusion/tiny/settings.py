"""Settings of a tiny-model training run, and how its phases share the wall-clock budget; the shipped run's record.

Split from ``train.py``: torch-free, so the CLI can validate a run's settings before torch loads.
"""

import json
from dataclasses import dataclass

from ..errors import ClipDiffusionError
from .models import PRESETS, TinyModelConfig

PHASES = ("clip", "vae", "pool", "unet")


@dataclass(frozen=True)
class TrainSettings:
    model: str = "tiny-sd"  # key of models.PRESETS
    minutes: float = 60.0
    # share of the budget per phase (the pool is bounded by pool_size, its share only caps it). The VAE gets a
    # fifth: until it draws the six colours apart, nothing downstream can (measured: after ~300 steps it still
    # mixes red/orange and blue/purple). The defaults are the shipped run's (run E of eval/training.md, seed 1).
    # The pool encodes pool_captions captions per scene (~100 s on 2 cores at 4 x 12,000), so its share is 0.08
    # (what it leaves unused passes to the UNet). eval/training.md has the runs that changed them and did worse.
    shares: tuple[float, ...] = (0.10, 0.20, 0.08, 0.62)
    clip_batch: int = 128
    vae_batch: int = 16
    unet_batch: int = 32
    clip_lr: float = 1e-3
    vae_lr: float = 2e-3
    # 1e-3: on the same frozen CLIP and VAE, 7,440 steps at 1e-3 beat 5e-4 by 0.16 / 0.23 on 1 / 2-object success
    # (shape accuracy 0.69 -> 0.81; eval/training.md, session 4). Run 3 (the first shipped model) used 5e-4.
    unet_lr: float = 1e-3
    warmup: int = 100
    # cosine decay of every phase's learning rate to this share of its base over the phase's budget (its step
    # cap where one is set, else its seconds): a short run ends on small steps instead of mid-stride
    # Off by default: the two runs with it (and hard negatives) drew colours worse (eval/training.md).
    lr_floor: float | None = None
    pool_size: int = 12000
    # captions drawn per pooled scene and encoded once, in the pool phase, by the frozen text tower; each UNet
    # step picks one of them. Encoding 32 fresh captions every step was a fifth of a UNet step's time. 0: a fresh
    # caption every step (run 3, the first shipped model).
    pool_captions: int = 4
    p_tags: float = 0.3  # captions with style-tag noise (some past 75 tokens: chunked contexts)
    # share of objects whose size a training caption names. At 0.8 (the shipped run) the model draws squares
    # whose size the prompt leaves open as circles (shape accuracy 0.57 open, 0.76 named); a run at 0.5 closed
    # that gap but scored lower overall, within what runs vary by (eval/training.md, session 3)
    size_named: float = 0.8
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_minutes: float = 3.0
    log_every: int = 10
    seed: int = 0
    max_steps: int | None = None  # per phase, on top of the clock (tests; reproducible short runs)
    # per-phase step caps (clip, vae, pool, unet), on top of the clock: a run measured in steps, not seconds
    # (sweeps on other hardware replay a 2-core budget's step counts)
    phase_steps: tuple[int, ...] | None = None
    # NegCLIP-style hard negatives: each caption's twin with one attribute changed joins the text side of the
    # image->text logits, so the text tower must encode shape and binding, which in-batch negatives (random
    # scenes, almost always told apart by colour and position alone) barely ask for. It makes a better CLIP
    # (twin test: shape 0.82 -> 0.87) but, in two 55-minute runs, a UNet that drew colours worse; off by default.
    clip_hard_negatives: bool = False
    # weight of an auxiliary loss on the tiny CLIP (models.CellReadout): cross-attention from nine cell queries
    # over the final hidden states (the UNet's context) must name each cell's colour, shape and size. 0: off
    # (run 3, the first shipped model: contrastive only). On run 3's VAE, a UNet of 3,720 steps learns 0.71 /
    # 0.69 / 0.57 on such a CLIP against 0.42 / 0.15 / 0.01 on run 3's own (eval/training.md, session 6)
    clip_readout: float = 1.0
    # share of the pool's captions whose objects follow a run of style tags of uniform length 0-240 tokens
    # (batches.deep_caption): objects at every depth of a window and in every chunk. 0: the shipped run E's
    # captions, where a few tags sit between the objects and nearly every object starts in a window's first 30
    # positions (eval/longpos)
    deep_objects: float = 0.0
    # share of the pool's captions past 75 tokens laid out by the window strategy instead of chunk (the UNet then
    # learns the sliding-window layout as well)
    window_share: float = 0.0
    # a tiny-model .safetensors whose text tower, VAE (with its scale factor) and UNet start the run: with
    # phase_steps 0,0,P,U it continues the UNet alone on a new pool (fine-tuning)
    init_from: str | None = None

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ClipDiffusionError(f"model: unknown preset {self.model!r} (one of {sorted(PRESETS)})")
        if not 0 < self.minutes <= 24 * 60:
            raise ClipDiffusionError(f"minutes: {self.minutes!r} is outside (0, 1440]")
        if len(self.shares) != len(PHASES) or any(s < 0 for s in self.shares):
            raise ClipDiffusionError(f"shares: {self.shares!r} needs {len(PHASES)} non-negative numbers")
        for name in ("clip_lr", "vae_lr", "unet_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ClipDiffusionError(f"{name}: {getattr(self, name)!r} is outside (0, 1)")
        if not 0 <= self.size_named <= 1:
            raise ClipDiffusionError(f"size_named: {self.size_named!r} is outside [0, 1] (a probability)")
        if not 0 <= self.clip_readout < 100:
            raise ClipDiffusionError(f"clip_readout: {self.clip_readout!r} is outside [0, 100) (a loss weight)")
        if self.lr_floor is not None and not 0 <= self.lr_floor <= 1:
            raise ClipDiffusionError(f"lr_floor: {self.lr_floor!r} is outside [0, 1] (a share of the base rate)")
        if not 0 <= self.pool_captions <= 64:
            raise ClipDiffusionError(f"pool_captions: {self.pool_captions!r} is outside [0, 64]")
        for name in ("deep_objects", "window_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ClipDiffusionError(f"{name}: {getattr(self, name)!r} is outside [0, 1] (a share)")
        if self.phase_steps is not None and (len(self.phase_steps) != len(PHASES) or min(self.phase_steps) < 0):
            raise ClipDiffusionError(f"phase_steps: {self.phase_steps!r} needs {len(PHASES)} non-negative counts")

    @property
    def config(self) -> TinyModelConfig:
        return PRESETS[self.model]


def phase_seconds(settings: TrainSettings, spent: dict | None = None) -> dict:
    """Seconds each phase may run: its share of the budget, plus what the phases before it left unused (the
    pool usually finishes in a fraction of its share; the shipped run left ~115 s of it idle). ``spent``: the
    seconds each finished phase took (the others count as unspent)."""
    total = sum(settings.shares)
    budgets, carry = {}, 0.0
    for p, share in zip(PHASES, settings.shares):
        budgets[p] = settings.minutes * 60 * share / total + carry
        if spent is None or p not in spent:
            carry = 0.0
            continue
        carry = max(0.0, budgets[p] - spent[p])
    return budgets


def pace_notes(settings: dict, steps: dict, reference: dict | None, *, below: float = 0.9) -> list:
    """Where a run trained more slowly than the shipped model's run did: phases whose steps per budgeted minute
    fell under ``below`` of the reference's. ``settings``/``steps`` are what ``export`` writes to a checkpoint's
    metadata (``clipdiffusion.tiny.train_settings`` / ``.steps``); ``reference`` is the same pair of the shipped
    file (``shipped_run()``). The phases run on the clock, so a slower CPU means fewer steps and, below the shipped
    counts, a weaker model (eval/training.md, run G). Only runs of the same preset and step caps compare; the pool
    is capped by its size and is left out."""
    if reference is None:
        return []
    ref_settings, ref_steps = reference
    if settings.get("model") != ref_settings.get("model") or settings.get("phase_steps") is not None:
        return []
    notes = []
    for phase in ("clip", "vae", "unet"):
        pace = steps.get(phase, 0) / settings["minutes"]
        ref_pace = ref_steps.get(phase, 0) / ref_settings["minutes"]
        if ref_pace > 0 and pace < below * ref_pace:
            expected = round(ref_pace * settings["minutes"])
            notes.append(f"{phase}: {steps.get(phase, 0)} steps, {pace / ref_pace:.0%} of the shipped run's pace "
                         f"({expected} in {settings['minutes']:g} minutes)")  # fmt: skip
    return notes


def shipped_run():
    """(train settings, step counts) recorded in the shipped tiny model's metadata, or None without one."""
    from safetensors import safe_open

    from ..pipeline import TINY_DATA

    files = sorted(TINY_DATA.glob("*.safetensors")) if TINY_DATA.is_dir() else []
    if len(files) != 1:
        return None
    with safe_open(str(files[0]), "np") as f:
        meta = f.metadata() or {}
    # a fine-tuned model (init_from) records the from-scratch run it started from: that run sets the pace
    prefix = "clipdiffusion.tiny.base_" if "clipdiffusion.tiny.base_steps" in meta else "clipdiffusion.tiny."
    try:
        run = (json.loads(meta[prefix + "train_settings"]), json.loads(meta[prefix + "steps"]))
    except (KeyError, ValueError):
        return None
    return run if all(isinstance(part, dict) for part in run) else None


# The shipped model in two stages, each a train-tiny run (eval/training.md): run E from scratch, replayed by its
# recorded step counts (it ran on the clock: 59 minutes, 2 threads, Intel Xeon), then the deep-object fine-tune of
# its UNet (issue 18). ``train-tiny --recipe shipped --out DIR`` runs both: DIR/base, then DIR.
SHIPPED_BASE = {"seed": 1, "phase_steps": (556, 2900, 188, 7138)}
SHIPPED_FINETUNE = {"seed": 0, "phase_steps": (0, 0, 94, 1500), "deep_objects": 0.5, "window_share": 0.5,
                    "pool_size": 6000, "unet_lr": 3e-4, "lr_floor": 0.1}  # fmt: skip
# ... and then the text tower's depth alignment (tiny/align.py, issue 18): its AlignSettings fields
SHIPPED_ALIGN = {"steps": 400, "batch": 32, "lr": 2e-4, "max_prefix": 72, "other_weight": 0.1, "seed": 0}


def recipe(name: str, base_model) -> tuple:
    """(from-scratch settings, fine-tune settings starting from ``base_model``, text-alignment settings) of a named
    recipe. The training runs are step-capped with a clock far above their need, so a slower machine trains the same
    steps, only longer."""
    from .align import AlignSettings

    if name != "shipped":
        raise ClipDiffusionError(f"recipe: unknown recipe {name!r} (one of ['shipped'])")
    generous = 24 * 60.0
    return (TrainSettings(minutes=generous, **SHIPPED_BASE),
            TrainSettings(minutes=generous, init_from=str(base_model), **SHIPPED_FINETUNE),
            AlignSettings(**SHIPPED_ALIGN))  # fmt: skip
