"""GPU speed switches, each one flag, in one place: what each does, its default and why, and applying it.

| flag                  | default                          | what it does                                          |
|-----------------------|----------------------------------|-------------------------------------------------------|
| --tf32 / --no-tf32    | on for CUDA (seed 001 trained    | fp32 matmuls and cuDNN convolutions in TF32 (10-bit   |
|                       | with --allow_tf32)               | mantissa) on Ampere and later; nothing on the CPU     |
| --compile             | off (minutes of warm-up)         | torch.compile the UNet (sampling, LoRA), or G and D   |
| --channels-last       | off (not yet measured)           | NHWC weights and activations for the convolutions     |
| --sdpa BACKEND        | auto (torch's choice)            | prefer one attention kernel: flash, efficient, math,  |
|                       |                                  | cudnn                                                 |
| --fused-optimizer     | on for CUDA                      | Adam(W)'s whole update in one kernel (`fused=True`)   |
| --vae-slicing         | off                              | decode a batch one image at a time: less memory       |
| --vae-tiling          | off                              | decode/encode large images in overlapping tiles       |

Every switch but tiling leaves results as they are up to rounding; tiling changes pixels near the seams (see
`minigen/sd/tiles.py`). None of them is a training setting: a resumed run takes the switches of its own command line.
`bench/bench_speed.py` measures each against its default (`make bench-gpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed

SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
CPU_SDPA = ("auto", "flash", "math")  # the backends torch implements on the CPU


FUSED_OPTIMIZERS = ("adam", "adamw")  # the training optimizers minigen builds with fused=True on CUDA


@dataclasses.dataclass(frozen=True)
class Speed:
    """The switches of one run. None: the device's default (on for CUDA, off elsewhere)."""
    tf32: bool | None = None
    compile: bool = False
    channels_last: bool = False
    sdpa: str = "auto"
    fused_optimizer: bool | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False

    def __post_init__(self):
        if self.sdpa not in SDPA_BACKENDS:
            raise ValueError(f"--sdpa {self.sdpa!r}: choose one of {', '.join(SDPA_BACKENDS)}")

    def resolved(self, device: str | torch.device, optimizer: str | None = None) -> "Speed":
        """The switches with the device's defaults filled in; the fused optimizer off for an `optimizer` that has no
        fused kernel here (None: no optimizer named, the switch as given)."""
        cuda = torch.device(device).type == "cuda"
        fused = cuda if self.fused_optimizer is None else self.fused_optimizer
        return dataclasses.replace(self, tf32=cuda if self.tf32 is None else self.tf32,
                                   fused_optimizer=fused and (optimizer is None or optimizer in FUSED_OPTIMIZERS))

    def describe(self, device: str | torch.device, optimizer: str | None = None) -> str:
        """One line for the log, e.g. `speed: tf32 on, compile off, channels-last off, sdpa auto, ...`. The fused
        optimizer is named only for a run that trains with `optimizer`."""
        s, cuda = self.resolved(device, optimizer), torch.device(device).type == "cuda"

        def state(on: bool) -> str:
            return "on" if on else "off"
        tf32 = state(s.tf32) + ("" if cuda else " (no effect on the CPU)")
        fused = "" if optimizer is None else f"fused optimizer {state(s.fused_optimizer)}" + (
            "" if optimizer in FUSED_OPTIMIZERS else f" ({optimizer} has no fused kernel here)") + ", "
        return (f"speed: tf32 {tf32}, compile {state(s.compile)}, channels-last {state(s.channels_last)}, "
                f"sdpa {s.sdpa}, {fused}vae slicing {state(s.vae_slicing)}, vae tiling {state(s.vae_tiling)}, "
                f"threads {torch.get_num_threads()}{_threads_chosen_by}")


# ---- CPU threads ----

_threads_chosen_by = ""  # why torch has the threads it has, for the speed line: set by apply_threads


def free_cores() -> tuple[int, int]:
    """(cores this process may run on, how many of them other work is not using): the busy ones are the 1-minute load
    average, rounded. On a busy 2-core machine two OpenMP threads spin-wait on each other: the demo's epoch took 47 s
    with 2 threads beside another job, 8.5 s with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return cores, max(1, cores - busy)


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads: `threads` (--threads) when given, else OMP_NUM_THREADS when set (torchrun sets 1 for
    each of several processes), else torch's default (one a physical core) lowered to the cores not busy now
    (`free_cores`). The speed line says which."""
    global _threads_chosen_by
    if threads:
        torch.set_num_threads(threads)
        _threads_chosen_by = " (--threads)"
    elif os.environ.get("OMP_NUM_THREADS"):
        _threads_chosen_by = " (OMP_NUM_THREADS)"
    else:
        cores, free = free_cores()
        torch.set_num_threads(min(torch.get_num_threads(), free))
        _threads_chosen_by = f" (the free cores: {free} of {cores}; --threads N to choose)"


# ---- the command line ----

HELP = {
    "tf32": "TF32 for fp32 matmuls and cuDNN convolutions on Ampere or later GPUs: about 2-8x the fp32 matmul rate, "
            "10-bit mantissa (default: on for CUDA, as seed 001 trained with --allow_tf32; no effect on the CPU)",
    "compile": "torch.compile {what}: faster steps after minutes of compiling, same results up to "
               "rounding (default: off; the warm-up costs more than a short run saves)",
    "channels_last": "channels-last (NHWC) memory format for {what}: tensor-core convolutions without transposes "
                     "(default: off until bench/bench_speed.py measures a gain on a GPU; same results up to rounding)",
    "sdpa": "attention kernel to prefer: auto (torch picks), flash, efficient, math, cudnn; attention a kernel cannot "
            "run (flash: fp32, or the VAE's 512-wide heads) falls back to math (default: auto)",
    "fused_optimizer": "Adam(W) with fused=True: the whole update in one CUDA kernel (default: on for CUDA, where "
                       "torch's documentation names it the fastest; off on the CPU, where it is slower)",
    "vae_slicing": "decode the batch one image at a time: the VAE's peak memory of one image, the same images "
                   "(default: off; a batch decodes a little faster together)",
    "vae_tiling": "decode (and img2img-encode) images larger than the VAE's sample size in overlapping tiles blended "
                  "linearly, as diffusers' enable_vae_tiling: memory of one tile, faint seams possible (default: off)",
}
SWITCHES = tuple(HELP)


def add_speed_args(p: argparse.ArgumentParser, switches: Iterable[str], what: str) -> None:
    """Add the flags of `switches` (names in SWITCHES) to `p`; `what` names the models they act on ("the UNet").
    A flag not given is absent from the namespace (`speed_from_args` fills in its default), as parsers with
    argument_default=SUPPRESS need."""
    group = p.add_argument_group("speed switches (see minigen/speed.py)")
    for name in switches:
        flag, text = "--" + name.replace("_", "-"), HELP[name].format(what=what)
        if name == "sdpa":
            group.add_argument(flag, choices=SDPA_BACKENDS, default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)


def speed_from_args(args: argparse.Namespace) -> Speed:
    """The switches given (on the command line or in its preset), each absent one at its default."""
    return Speed(**{name: getattr(args, name) for name in SWITCHES if hasattr(args, name)})


# ---- applying them ----

@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA fp32 matmuls and cuDNN convolutions within the block, as they were after it. (torch's own
    defaults: off for matmuls, on for cuDNN.)"""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def check_sdpa(choice: str, device: str | torch.device) -> None:
    """Refuse a backend torch has no kernel of on this device, before any model loads."""
    if torch.device(device).type != "cuda" and choice not in CPU_SDPA:
        raise ValueError(f"--sdpa {choice} needs a CUDA device; on {device} choose {', '.join(CPU_SDPA)}")


def sdpa_context(choice: str) -> contextlib.AbstractContextManager:
    """Within it, scaled_dot_product_attention prefers `choice`. Where that kernel cannot run (flash: no fp32, head
    sizes past 256; cuDNN: older GPUs) it falls back to the memory-efficient kernel, then to math: math holds the whole
    attention matrix, 1 GiB per image in the VAE's 1024x1024 attention."""
    backend = SDPA_BACKENDS[choice]
    if backend is None:
        return contextlib.nullcontext()
    fallbacks = [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != backend]
    return sdpa_kernel([backend] + (fallbacks if backend != SDPBackend.MATH else []), set_priority=True)


@contextlib.contextmanager
def switched(speed: Speed, device: str | torch.device, optimizer: str | None = None) -> Iterator[Speed]:
    """The process-wide switches (TF32, the attention kernel) for the `with` block, as they were after it; yields
    the switches resolved for `device` (and the training run's `optimizer`, if any). Prints the one-line
    description on stderr (rank 0 only, under torchrun)."""
    s = speed.resolved(device, optimizer)
    check_sdpa(s.sdpa, device)
    if distributed.is_main():
        print(s.describe(device, optimizer), file=sys.stderr)
    with tf32(s.tf32), sdpa_context(s.sdpa):
        yield s


def prepare_model(model: nn.Module, speed: Speed) -> nn.Module:
    """Channels-last, then torch.compile, in place (parameter names stay as they are: checkpoints and LoRA files do
    not see it). Add LoRA adapters before: a module added after compiling recompiles on the next call."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()
    return model


def prepare_pipeline_model(model, speed: Speed) -> None:
    """A Stable Diffusion model (minigen.sd.model.StableDiffusion) for sampling: the UNet channels-last and compiled,
    the VAE channels-last, sliced and tiled as asked. The VAE is not compiled: it runs once per image."""
    prepare_model(model.unet, speed)
    prepare_model(model.vae, dataclasses.replace(speed, compile=False))
    model.vae.slicing, model.vae.tiling = speed.vae_slicing, speed.vae_tiling


def optimizer_kernel(params: Iterable[torch.Tensor], speed: Speed) -> dict:
    """AdamW's implementation keyword: fused=True when every parameter is a floating CUDA tensor (the fused kernel's
    requirement) and --no-fused-optimizer was not given, else {} (torch's choice: foreach on CUDA, else a loop)."""
    params = list(params)
    eligible = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if speed.fused_optimizer is not False and eligible else {}
