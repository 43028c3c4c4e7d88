"""A1111 sampler and scheduler names, and the one table from them to our engine's names. Torch-free.

Names and aliases follow A1111 v1.10 (`sd_samplers_kdiffusion`, `sd_samplers_timesteps`, `sd_schedulers`), so
clients that send "Euler a", "DPM++ 2M Karras" or "k_euler" get the sampler they mean; our own names are accepted
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import RequestError


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111 display name
    aliases: tuple[str, ...]
    engine: tuple[str, ...]  # our SAMPLERS keys that implement it, first present wins
    schedule: str | None = None  # legacy names such as "DPM++ 2M Karras" fix the schedule
    automatic: str | None = None  # A1111 v1.10's schedule for "Automatic" (the sampler's 'scheduler' option)
    options: tuple[tuple[str, object], ...] = ()  # A1111's other options, shown by GET /samplers


_SECOND = ("second_order", True)
_ENSD = ("uses_ensd", True)
_BROWNIAN = ("brownian_noise", True)
_DISCARD = ("discard_next_to_last_sigma", True)

# A1111 v1.10 `sd_samplers_kdiffusion.samplers_k_diffusion`, `sd_samplers_timesteps` ("DDIM", "UniPC") and
# `sd_samplers_lcm` ("LCM"): names, aliases and options. "automatic" is the sampler's 'scheduler' option, the schedule
# A1111 uses when the request's scheduler is "Automatic" (or absent) and the name fixes none; the timestep samplers
# (DDIM, UniPC) and LCM have none there: our default schedule.
A1111_SAMPLERS = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), ("dpmpp_2m",), automatic="karras"),
    A1111Sampler("DPM++ SDE", ("k_dpmpp_sde",), ("dpmpp_sde",), automatic="karras", options=(_SECOND, _BROWNIAN)),
    A1111Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), ("dpmpp_2m_sde",), automatic="exponential",
                 options=(_BROWNIAN,)),
    A1111Sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), ("dpmpp_2m_sde_heun",), automatic="exponential",
                 options=(_BROWNIAN, ("solver_type", "heun"))),
    A1111Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), ("dpmpp_2s_a",), automatic="karras", options=(_ENSD, _SECOND)),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), ("euler_ancestral", "euler_a"), options=(_ENSD,)),
    A1111Sampler("Euler", ("k_euler",), ("euler",)),
    A1111Sampler("LMS", ("k_lms",), ("lms",)),
    A1111Sampler("Heun", ("k_heun",), ("heun",), options=(_SECOND,)),
    A1111Sampler("DPM2", ("k_dpm_2",), ("dpm2",), automatic="karras", options=(_DISCARD, _SECOND)),
    A1111Sampler("DPM2 a", ("k_dpm_2_a",), ("dpm2_a",), automatic="karras", options=(_DISCARD, _ENSD, _SECOND)),
    A1111Sampler("DDIM", ("ddim",), ("ddim",)),
    A1111Sampler("UniPC", ("unipc",), ("unipc",)),
    A1111Sampler("LCM", ("k_lcm",), ("lcm",)),
    # Before v1.9 the schedule was part of the sampler name; old clients still send these (any other
    # "<sampler> <schedule label>" is split the same way by resolve_sampler).
    A1111Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",), ("dpmpp_2m",), "karras"),
    A1111Sampler("Euler Karras", (), ("euler",), "karras"),
    A1111Sampler("LMS Karras", ("k_lms_ka",), ("lms",), "karras"),
    A1111Sampler("DPM2 Karras", ("k_dpm_2_ka",), ("dpm2",), "karras"),
    A1111Sampler("DPM2 a Karras", ("k_dpm_2_a_ka",), ("dpm2_a",), "karras"),
    A1111Sampler("DPM++ 2S a Karras", ("k_dpmpp_2s_a_ka",), ("dpmpp_2s_a",), "karras"),
    A1111Sampler("DPM++ SDE Karras", ("k_dpmpp_sde_ka",), ("dpmpp_sde",), "karras"),
    A1111Sampler("DPM++ 2M SDE Karras", ("k_dpmpp_2m_sde_ka",), ("dpmpp_2m_sde",), "karras"),
    A1111Sampler("DPM++ 2M SDE Exponential", ("k_dpmpp_2m_sde_exp",), ("dpmpp_2m_sde",), "exponential"),
    A1111Sampler("DPM++ 2M SDE Heun Karras", ("k_dpmpp_2m_sde_heun_ka",), ("dpmpp_2m_sde_heun",), "karras"),
    A1111Sampler("DPM++ 2M SDE Heun Exponential", ("k_dpmpp_2m_sde_heun_exp",), ("dpmpp_2m_sde_heun",),
                 "exponential"),
)


@dataclass(frozen=True)
class A1111Scheduler:
    name: str
    label: str
    engine: tuple[str, ...]
    default_rho: float = -1.0
    aliases: tuple[str, ...] = ()
    need_inner_model: bool = False


# A1111 v1.10 `sd_schedulers.schedulers`. "uniform" there is k-diffusion's DiscreteSchedule.get_sigmas (timesteps
# evenly spaced from the last to 0), which is the schedule our "normal" computes; A1111's "normal" spaces
# sigma_to_t(sigma_max)..sigma_to_t(sigma_min), the same end points, so the same sigmas. An entry without an engine
# is one we do not implement: not listed, and a request naming it is refused with its name.
A1111_SCHEDULERS = (
    A1111Scheduler("automatic", "Automatic", ()),
    A1111Scheduler("uniform", "Uniform", ("normal",), need_inner_model=True),
    A1111Scheduler("karras", "Karras", ("karras",), 7.0),
    A1111Scheduler("exponential", "Exponential", ("exponential",)),
    A1111Scheduler("polyexponential", "Polyexponential", ("polyexponential",), 1.0),
    A1111Scheduler("sgm_uniform", "SGM Uniform", ("sgm_uniform",), aliases=("SGMUniform",), need_inner_model=True),
    A1111Scheduler("kl_optimal", "KL Optimal", ("kl_optimal",)),
    A1111Scheduler("align_your_steps", "Align Your Steps", ()),
    A1111Scheduler("simple", "Simple", ("simple",), need_inner_model=True),
    A1111Scheduler("normal", "Normal", ("normal",), need_inner_model=True),
    A1111Scheduler("ddim", "DDIM", ("ddim", "ddim_uniform"), need_inner_model=True),
    A1111Scheduler("beta", "Beta", (), need_inner_model=True),
    A1111Scheduler("karras_exponential", "Karras Exponential", ()),
)
# Why each A1111 schedule without an engine is refused (named in the 422).
UNSUPPORTED_SCHEDULERS = {
    "align_your_steps": "tabulated per model family, not implemented here",
    "beta": "needs the inverse regularized incomplete beta function, not implemented here",
    "karras_exponential": "not implemented here",
}

DEFAULT_SCHEDULE = "normal"


def _first_present(candidates, available):
    return next((c for c in candidates if c in available), None)


def sampler_items(available: tuple[str, ...]) -> list[dict]:
    """GET /sdapi/v1/samplers: the A1111 names we can run (with A1111's options, the "Automatic" schedule as
    'scheduler'), then our own names not covered by one."""
    items, covered = [], set()
    for s in A1111_SAMPLERS:
        engine = _first_present(s.engine, available)
        if engine is not None:
            covered.add(engine)
            options = {"scheduler": s.schedule or s.automatic} if (s.schedule or s.automatic) else {}
            options.update(dict(s.options))
            items.append({"name": s.name, "aliases": list(s.aliases) + [engine], "options": options})
    items += [{"name": name, "aliases": [], "options": {}} for name in available if name not in covered]
    return items


def _scheduler_present(s: A1111Scheduler, available) -> bool:
    return s.name == "automatic" or _first_present(s.engine, available) is not None


def scheduler_items(available: tuple[str, ...]) -> list[dict]:
    """GET /sdapi/v1/schedulers in A1111's shape: the A1111 schedules we implement ("Automatic" first)."""
    items = []
    for s in A1111_SCHEDULERS:
        if not _scheduler_present(s, available):
            continue
        items.append({"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                      "default_rho": s.default_rho, "need_inner_model": s.need_inner_model})
    return items


def _find_a1111_sampler(name: str, available):
    for s in A1111_SAMPLERS:
        if name == s.name or name in s.aliases or name.lower() == s.name.lower():
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine, s.schedule or s.automatic
    return None


def resolve_sampler(name: str, available: tuple[str, ...], field_name: str = "sampler_name"):
    """An A1111 display name or alias, or one of our names -> (our sampler, schedule it implies or None).

    The implied schedule is what a legacy name fixes ("DPM++ 2M Karras"; any "<sampler> <schedule label>" is split
    as A1111 v1.10 does) or A1111's "Automatic" choice for the sampler; ``resolve_schedule`` applies it only when
    the request's scheduler is absent or "Automatic". Our own engine names imply nothing (our default schedule)."""
    if name in available:
        return name, None
    found = _find_a1111_sampler(name, available)
    if found is not None:
        return found
    for sched in A1111_SCHEDULERS:
        suffix = " " + sched.label
        if sched.engine and name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
            base = _find_a1111_sampler(name[: -len(suffix)], available)
            if base is not None:  # the schedule is checked where it is resolved (resolve_schedule)
                return base[0], sched.engine[0]
    names = [item["name"] for item in sampler_items(available)]
    raise RequestError(field_name, name, f"unknown sampler; available: {', '.join(names)} "
                                         f"(or ours: {', '.join(available)})")


def resolve_schedule(name: str | None, available: tuple[str, ...], implied: str | None,
                     field_name: str = "scheduler") -> str:
    """A request's scheduler (A1111 name or label, or ours) -> our schedule. Absent or "Automatic": the sampler's
    implied schedule, else ours by default. An A1111 schedule we do not implement is a RequestError naming it."""
    if name is None or name.lower() == "automatic":
        choice = implied or DEFAULT_SCHEDULE
        return choice if choice in available or not available else available[0]
    if name in available:
        return name
    for s in A1111_SCHEDULERS:
        if name in (s.name, s.label, *s.aliases) or name.lower() == s.label.lower():
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine
            if s.name in UNSUPPORTED_SCHEDULERS:
                names = [item["label"] for item in scheduler_items(available)]
                raise RequestError(field_name, name,
                                   f"A1111 scheduler {s.label!r} is not supported by this server "
                                   f"({UNSUPPORTED_SCHEDULERS[s.name]}); available: {', '.join(names)}")
    names = [item["label"] for item in scheduler_items(available)]
    raise RequestError(field_name, name, f"unknown scheduler; available: {', '.join(names)} "
                                         f"(or ours: {', '.join(available)})")


def sampler_display_name(engine: str) -> str:
    for s in A1111_SAMPLERS:
        if s.schedule is None and engine in s.engine:
            return s.name
    return engine
