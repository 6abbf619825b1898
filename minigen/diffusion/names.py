"""Sampler names as A1111 and ComfyUI spell them, resolved to minigen's (`schedule.SAMPLERS`) in one place.

    resolve_sampler("DPM++ 2M Karras")   # ("dpmpp_2m", True)
    resolve_sampler("euler_ancestral")   # ("euler_a", None): no schedule named, the caller's --karras decides
    resolve_sampler("dpmpp_2m karras")   # ComfyUI's sampler and scheduler, one space apart: ("dpmpp_2m", True)
    a1111_names("dpmpp_2m", True)        # ("DPM++ 2M", "Karras"): A1111's "Sampler" and "Schedule type"

Names are matched without regard to case. A1111 before 1.9 folded the schedule into the sampler's name
("DPM++ 2M Karras"); 1.9 and later write it apart ("Sampler: DPM++ 2M, Schedule type: Karras"); both are read.
"""

from __future__ import annotations

from .schedule import SAMPLERS

# A1111's display names, minigen's name first: also the names the PNG's infotext is written with.
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}
COMFYUI_SAMPLERS = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "euler_a": "euler_ancestral",
                    "dpmpp_2m": "dpmpp_2m"}

# Schedule names -> Karras sigmas or not. minigen's other schedule is diffusers' own spacing (the model's
# scheduler_config, "leading" for SDXL), which no A1111 or ComfyUI schedule reproduces exactly.
# Patch: A1111's "Uniform" and ComfyUI's "normal" are the nearest names for it, and are what minigen writes and reads.
SCHEDULES = {"karras": True, "uniform": False, "normal": False}

ALIASES = {name.lower(): ours for table in (A1111_SAMPLERS, COMFYUI_SAMPLERS)
           for ours, name in table.items()} | {name: name for name in SAMPLERS}


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[str, bool | None]:
    """(minigen's sampler name, Karras sigmas or None when no schedule is named) for a minigen, A1111 or ComfyUI
    sampler name, optionally followed by a schedule name ("DPM++ 2M Karras"), or with the schedule given apart
    (A1111's "Schedule type"). ValueError names the allowed spellings."""
    words = " ".join(name.split()).lower()
    karras = None
    if words not in ALIASES and " " in words:
        head, _, tail = words.rpartition(" ")
        if tail in SCHEDULES:
            words, karras = head, SCHEDULES[tail]
    if words not in ALIASES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} (or A1111's "
                         f"{', '.join(A1111_SAMPLERS.values())}, or ComfyUI's names), optionally followed by a "
                         f"schedule ({', '.join(SCHEDULES)})")
    if schedule is not None:
        if schedule.strip().lower() not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        named = SCHEDULES[schedule.strip().lower()]
        if karras is not None and karras != named:
            raise ValueError(f"sampler {name!r} and schedule {schedule!r} disagree")
        karras = named
    return ALIASES[words], karras


def karras_of(named: bool | None, karras_flag: bool) -> bool:
    """Karras sigmas or not, from the schedule a sampler's name carries (None: none) and the --karras flag."""
    if named is False and karras_flag:
        raise ValueError("--sampler names a schedule without Karras sigmas, and --karras asks for them")
    return karras_flag or bool(named)


def a1111_names(sampler: str, karras: bool) -> tuple[str, str]:
    """A1111's "Sampler" and "Schedule type" for minigen's sampler and schedule."""
    return A1111_SAMPLERS[sampler], "Karras" if karras else "Uniform"
