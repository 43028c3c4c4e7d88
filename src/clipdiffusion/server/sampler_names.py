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


# A1111 `sd_samplers_kdiffusion.samplers_k_diffusion` / `sd_samplers_timesteps` names and aliases.
A1111_SAMPLERS = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), ("dpmpp_2m",)),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), ("euler_ancestral", "euler_a")),
    A1111Sampler("Euler", ("k_euler",), ("euler",)),
    A1111Sampler("Heun", ("k_heun",), ("heun",)),
    A1111Sampler("DDIM", ("ddim",), ("ddim",)),
    # Before v1.9 the schedule was part of the sampler name; old clients still send these.
    A1111Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",), ("dpmpp_2m",), "karras"),
    A1111Sampler("Euler Karras", (), ("euler",), "karras"),
)


@dataclass(frozen=True)
class A1111Scheduler:
    name: str
    label: str
    engine: tuple[str, ...]
    default_rho: float = -1.0


# A1111 `sd_schedulers.schedulers`. "uniform" there is k-diffusion's DiscreteSchedule.get_sigmas (timesteps
# evenly spaced from the last to 0), which is the schedule our "normal" computes; A1111's "normal" spaces
# sigma_to_t(sigma_max)..sigma_to_t(sigma_min), the same end points.
A1111_SCHEDULERS = (
    A1111Scheduler("automatic", "Automatic", ()),
    A1111Scheduler("uniform", "Uniform", ("normal",)),
    A1111Scheduler("karras", "Karras", ("karras",), 7.0),
    A1111Scheduler("exponential", "Exponential", ("exponential",)),
    A1111Scheduler("sgm_uniform", "SGM Uniform", ("sgm_uniform",)),
    A1111Scheduler("simple", "Simple", ("simple",)),
    A1111Scheduler("normal", "Normal", ("normal",)),
    A1111Scheduler("ddim", "DDIM", ("ddim", "ddim_uniform")),
)

DEFAULT_SCHEDULE = "normal"


def _first_present(candidates, available):
    return next((c for c in candidates if c in available), None)


def sampler_items(available: tuple[str, ...]) -> list[dict]:
    """GET /sdapi/v1/samplers: the A1111 names we can run, then our own names not covered by one."""
    items, covered = [], set()
    for s in A1111_SAMPLERS:
        engine = _first_present(s.engine, available)
        if engine is not None:
            covered.add(engine)
            options = {"scheduler": s.schedule} if s.schedule else {}
            items.append({"name": s.name, "aliases": list(s.aliases) + [engine], "options": options})
    items += [{"name": name, "aliases": [], "options": {}} for name in available if name not in covered]
    return items


def scheduler_items(available: tuple[str, ...]) -> list[dict]:
    items = []
    for s in A1111_SCHEDULERS:
        if s.engine and _first_present(s.engine, available) is None:
            continue
        items.append({"name": s.name, "label": s.label, "aliases": None,
                      "default_rho": s.default_rho, "need_inner_model": False})
    return items


def resolve_sampler(name: str, available: tuple[str, ...], field_name: str = "sampler_name"):
    """An A1111 display name or alias, or one of our names -> (our sampler, schedule it implies or None)."""
    if name in available:
        return name, None
    for s in A1111_SAMPLERS:
        if name == s.name or name in s.aliases or name.lower() == s.name.lower():
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine, s.schedule
    names = [item["name"] for item in sampler_items(available)]
    raise RequestError(field_name, name, f"unknown sampler; available: {', '.join(names)}")


def resolve_schedule(name: str | None, available: tuple[str, ...], implied: str | None,
                     field_name: str = "scheduler") -> str:
    if name is None or name.lower() == "automatic":
        choice = implied or DEFAULT_SCHEDULE
        return choice if choice in available or not available else available[0]
    if name in available:
        return name
    for s in A1111_SCHEDULERS:
        if name in (s.name, s.label):
            engine = _first_present(s.engine, available)
            if engine is not None:
                return engine
    names = [item["name"] for item in scheduler_items(available)]
    raise RequestError(field_name, name, f"unknown scheduler; available: {', '.join(names)}")


def sampler_display_name(engine: str) -> str:
    for s in A1111_SAMPLERS:
        if s.schedule is None and engine in s.engine:
            return s.name
    return engine
