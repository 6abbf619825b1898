"""How much memory one LoRA training step needs, known before any weight is loaded.

The plan builds the real model from its configs under PyTorch's FakeTensorMode (tensors with shapes and dtypes but
no data, so a 2.6B-parameter UNet costs nothing), adds the run's LoRA, optimizer and gradient checkpointing, and
runs two real training steps through the same modules the trainer uses. `LiveStorage` watches every tensor storage
those steps create and free and keeps the peak of the bytes alive at once, split by what they hold:

    weights       the frozen model (UNet, text encoders, VAE: the trainer keeps them all on the device)
    lora + optim  the adapters, their gradients and the optimizer's state
    activations   what the forward pass saves for the backward pass, and the backward pass's temporaries

This counts tensors only, as `torch.cuda.max_memory_allocated` does; the CUDA context (~0.3-0.5 GB) and the
caching allocator's slack come on top of it on a GPU. The step is traced on the CPU: kernels chosen for a GPU
(flash attention, cuBLAS) allocate alike for the model's own tensors; autocast follows CUDA's policy, not the CPU's
(`cuda_autocast_policy`).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

PARTS = ("weights", "lora + optim", "activations")
GB = 1e9


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storage alive, by part, and their peak. `part` names what new tensors are counted as."""

    def __init__(self):
        super().__init__()
        self.part = "activations"
        self.parts_of: dict[int, str] = {}  # id(storage) -> part
        self.nbytes: dict[int, int] = {}
        self.alive = dict.fromkeys(PARTS, 0)
        self.peak, self.at_peak = 0, dict(self.alive)

    def count(self, tensor: torch.Tensor, part: str | None = None) -> None:
        """Count `tensor`'s storage under `part`, or the current part if none is given. A storage counted already
        (a view, an op that returns its input) moves only when a part is given (a gradient to "lora + optim")."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.parts_of and part is None:
            return
        part = part or self.part
        if key in self.parts_of:
            self.alive[self.parts_of[key]] -= self.nbytes[key]
        else:
            self.nbytes[key] = storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.parts_of[key] = part
        self.alive[part] += self.nbytes[key]
        total = sum(self.alive.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.alive)

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor`'s storage, alive as it is: a model moved off the GPU (cpu offload)."""
        self._free(id(tensor.untyped_storage()))

    def _free(self, key: int) -> None:
        if key in self.parts_of:  # (not when forgotten already)
            self.alive[self.parts_of.pop(key)] -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # Patch: a fake tensor has no value to read. Adafactor reads its step count and norms with .item() to
            # scale its update; what the step allocates does not depend on them, so every read is 1.
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out


class Untracked:
    """Stands in for LiveStorage where nothing is counted: steps measured from outside, as the tests do."""
    part = ""

    def count(self, tensor: torch.Tensor, part: str | None = None) -> None:
        pass


@dataclass
class MemoryPlan:
    peak: int  # bytes of tensors alive at the peak
    parts: dict[str, int]  # the peak, by part
    seconds: float  # how long planning took
    setting: str  # what was planned, in words
    advice: list[str]  # switches that lower the peak, most effective first

    def describe(self) -> str:
        parts = ", ".join(f"{name} {self.parts[name] / GB:.2f}" for name in PARTS)
        return (f"memory plan ({self.setting}): peak {self.peak / GB:.2f} GB of tensors = {parts} GB "
                f"(planned in {self.seconds:.0f} s)")


def training_advice(cfg) -> list[str]:
    """Switches that lower a LoRA run's peak, most effective first."""
    tips = []
    if not cfg.gradient_checkpointing:
        tips.append("--gradient-checkpointing (recomputes activations: the largest saving)")
    if cfg.mixed_precision == "no":
        tips.append("--mixed-precision bf16 (halves the frozen weights and activations)")
    if cfg.batch > 1:
        tips.append(f"--batch {max(1, cfg.batch // 2)} --grad-accum {cfg.grad_accum * 2} (same global batch)")
    if cfg.train_text_encoder:
        tips.append("--no-train-text-encoder (text embeddings cached once instead)")
    if cfg.optimizer == "adamw":
        tips.append("--optimizer adafactor (factored second moments)")
    tips.append("a lower --resolution")
    return tips


CUDA_CONTEXT = 0.5e9  # bytes of the CUDA context and cuBLAS workspace, which are not tensors: a typical size


def check_fits(plan: MemoryPlan, device: torch.device, force: bool = False) -> None:
    """Refuse (ValueError) a run on a CUDA device whose free memory is less than the plan's peak plus the CUDA
    context, naming the switches that would make it fit; `force` only warns."""
    free, _ = torch.cuda.mem_get_info(device)
    need = plan.peak + CUDA_CONTEXT
    if need <= free:
        return
    message = (f"the plan needs about {need / GB:.1f} GB on {device} and {free / GB:.1f} GB are free; "
               f"try {'; '.join(plan.advice)} (or --force to start anyway)")
    if not force:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)


def model_configs(spec: str, allow_pickle: bool = False) -> dict[str, dict]:
    """The configs of `--model` without reading a weight: random:<preset>, a diffusers folder's own, those a single
    safetensors file's header shows (its tensors' names and shapes, `sd.detect`), or, with `allow_pickle`, those of a
    pickled checkpoint's tensors (unpickled onto the meta device: shapes without data)."""
    from ..io import PICKLE_SUFFIXES, load_weights, read_header
    from ..sd.configs import get_config
    from ..sd.detect import detect
    from ..sd.model import RANDOM, parse_random, read_diffusers_configs

    if spec.startswith(RANDOM):
        return get_config(parse_random(spec)[0])
    if not Path(spec).exists():
        raise FileNotFoundError(2, "no such model file or folder", spec)
    if Path(spec).is_dir():
        return read_diffusers_configs(Path(spec))
    if Path(spec).suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = load_weights(spec, allow_pickle, device="meta")  # refused unless allow_pickle
        return detect({k: tuple(v.shape) for k, v in tensors.items()}, metadata, spec).configs
    header, metadata = read_header(spec)
    return detect({k: tuple(v["shape"]) for k, v in header.items()}, metadata, spec).configs


def plan_lora_step(cfg, configs: dict[str, dict] | None = None, fake: bool = True,
                   allow_pickle: bool = False, from_scratch: bool = False) -> MemoryPlan:
    """Peak memory of a LoRA training step with `cfg`'s settings (a LoRATrainConfig). `fake=False` runs the same
    steps on real tensors: what the tests compare the plan against. `allow_pickle`: read a pickled --model.
    from_scratch: every weight of the UNet and the text encoders trains, in fp32, instead of a LoRA (train_sd.py's
    second stage; its "lora + optim" part is then those weights' gradients and optimizer state)."""
    from ..images import parse_size

    start = time.perf_counter()
    configs = configs or model_configs(cfg.model, allow_pickle)
    h, w = parse_size(cfg.resolution)
    h, w = max(cfg.bucket_step, h // cfg.bucket_step * cfg.bucket_step), max(cfg.bucket_step,
                                                                            w // cfg.bucket_step * cfg.bucket_step)
    tracker = LiveStorage()
    with FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext(), tracker:
        _two_steps(cfg, configs, h, w, tracker, from_scratch)
    trained = "every UNet and text-encoder weight trained" if from_scratch else f"rank {cfg.rank}"
    setting = (f"{h}x{w}, batch {cfg.batch}, {trained}, {cfg.mixed_precision}, {cfg.optimizer}"
               + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
               + (", text encoders trained" if cfg.train_text_encoder and not from_scratch else "")
               + (", latents encoded each step" if cfg.cache_latents == "off" else ""))
    return MemoryPlan(tracker.peak, tracker.at_peak, time.perf_counter() - start, setting, training_advice(cfg))


def _two_steps(cfg, configs: dict[str, dict], h: int, w: int, tracker: LiveStorage | None = None,
               from_scratch: bool = False) -> None:
    """What LoRATrainer does for one optimizer step, twice (the optimizer's state appears in the first); counted by
    `tracker` when given. from_scratch: the UNet and text encoders train whole (`plan_lora_step`)."""
    from .config import MIXED_PRECISION, add_adapters

    tracker = tracker or Untracked()
    dtype = MIXED_PRECISION[cfg.mixed_precision]
    models = _frozen_models(configs, torch.float32 if from_scratch else dtype, tracker)
    tracker.part = "lora + optim"
    trained = {"unet": models["unet"]} | ({p: models[p] for p in text_encoders(models)}
                                          if cfg.train_text_encoder or from_scratch else {})
    if from_scratch:
        for model in trained.values():
            model.requires_grad_(True)
    else:
        add_adapters(trained, cfg)
    if cfg.gradient_checkpointing:
        for model in trained.values():
            model.set_gradient_checkpointing(True)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    optimizer = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD}[cfg.optimizer](
        params, lr=cfg.lr)
    with cuda_autocast_policy():  # for the backward pass too: gradient checkpointing recomputes the forward there
        for _ in range(2):
            tracker.part = "activations"
            loss = _loss(cfg, models, h, w, dtype)
            loss.backward()
            for p in params:
                if p.grad is not None:
                    tracker.count(p.grad, "lora + optim")
            del loss
            tracker.part = "lora + optim"
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def text_encoders(models: dict[str, torch.nn.Module]) -> list[str]:
    """The text-encoder parts a model has: both for SDXL, one for SD 1/2."""
    return [part for part in ("text_encoder", "text_encoder_2") if part in models]


def _frozen_models(configs: dict[str, dict], dtype: torch.dtype, tracker) -> dict[str, torch.nn.Module]:
    """The parts the configs have (SDXL's four; the refiner's and SD 1.x/2.x's three), frozen, in `dtype` (the VAE in
    fp32, as load_model keeps it), counted as weights."""
    from ..sd.model import PARTS as MODEL_PARTS, build_model

    tracker.part = "weights"
    models = {}
    for part in (p for p in MODEL_PARTS if p in configs):  # made in their dtype: fake tensors cannot .to()
        with default_dtype(torch.float32 if part == "vae" else dtype):
            models[part] = build_model(part, configs[part]).requires_grad_(False)
    for model in models.values():
        for t in (*model.parameters(), *model.buffers()):
            tracker.count(t, "weights")
    return models


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


CUDA_AUTOCAST_FP32 = ("group_norm", "layer_norm", "softmax", "log_softmax")  # of CUDA autocast's fp32 list, the
#                                                                           ones these models call (their modules)


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Within it, CPU autocast runs group norm, layer norm and softmax in fp32, on fp32 copies of their inputs, as
    CUDA autocast does. Patch: the CPU's autocast keeps them in bf16/fp16, so a step traced on the CPU would count
    their outputs, and what the backward pass saves of them, at half the bytes a GPU holds."""
    saved = {name: getattr(F, name) for name in CUDA_AUTOCAST_FP32}

    def in_fp32(op):
        @functools.wraps(op)
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return op(*args, **kwargs)
            up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return op(*tree_map(up, args), **tree_map(up, kwargs))
        return run
    for name, op in saved.items():
        setattr(F, name, in_fp32(op))
    try:
        yield
    finally:
        for name, op in saved.items():
            setattr(F, name, op)


def _loss(cfg, models: dict, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """One micro-batch's loss as LoRATrainer.loss computes it, on random inputs of the run's shapes."""
    unet, B = models["unet"], cfg.batch
    if cfg.cache_latents == "off":  # encoded every step, without gradients
        with torch.no_grad():
            vae = models["vae"]
            latents = vae.encode(torch.randn(B, 3, h, w)).sample() * vae.scaling_factor  # (B, 4, h/f, w/f)
    else:
        factor = 2 ** (len(models["vae"].encoder.down_blocks) - 1)
        latents = torch.randn(B, 4, h // factor, w // factor)
    with torch.autocast(latents.device.type, dtype, enabled=cfg.mixed_precision != "no"):
        if cfg.train_text_encoder:
            context, pooled = _encode(models, torch.zeros(B, 77, dtype=torch.long))
        else:  # cached: read from memory, moved to the device per batch
            width = sum(models[p].config.hidden_size for p in text_encoders(models))
            context = torch.randn(B, 77, width)
            pooled = torch.randn(B, models["text_encoder_2"].config.projection_dim) if "text_encoder_2" in models \
                else None
        weight_dtype = unet.conv_in.weight.dtype
        pooled, time_ids = _added_conditioning(models, pooled, weight_dtype)
        t = torch.randint(0, 1000, (B,))
        noise = torch.randn_like(latents)
        pred = unet(latents.to(weight_dtype), t, context.to(weight_dtype), pooled, time_ids)
    return F.mse_loss(pred.float(), noise)


def _encode(models: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (B, 77) through the text encoder(s) as encode_prompt sends them: context (B, 77, D) and pooled (B, P)
    or None for SD 1/2. Any layer's hidden state costs the same memory: the penultimate one is taken."""
    outs = [models[part](ids) for part in text_encoders(models)]
    context = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
    return context, outs[-1].text_embeds if "text_encoder_2" in models else None


def _added_conditioning(models: dict, pooled: torch.Tensor | None,
                        dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDXL's pooled prompt (B, P) and zero time ids (B, 6; the refiner's 5) in `dtype`; (None, None) for SD 1/2,
    whose UNet takes neither."""
    unet = models["unet"]
    if pooled is None or unet.config.get("addition_embed_type") != "text_time":
        return None, None
    ids = (unet.config["projection_class_embeddings_input_dim"] - pooled.shape[-1]) // unet.config["addition_time_embed_dim"]
    return pooled.to(dtype), torch.zeros(pooled.shape[0], ids, dtype=dtype)


def plan_sampling(configs: dict[str, dict], dtype: torch.dtype, height: int, width: int, num_images: int = 1,
                  guidance: bool = True, vae_slicing: bool = False, vae_tiling: bool = False,
                  cpu_offload: bool = False) -> MemoryPlan:
    """Peak memory of drawing `num_images` images, as Pipeline does: the prompt through the text encoder(s), one
    denoising step of the UNet (a batch of 2 x num_images with classifier-free guidance), the fp32 VAE decode (one
    image at a time with `vae_slicing`, in tiles with `vae_tiling`, as --vae-slicing/--vae-tiling decode). With
    `cpu_offload` a model's weights count only while it runs (the text encoders together: an overestimate, below
    the UNet's step)."""
    start, tracker = time.perf_counter(), LiveStorage()

    @contextlib.contextmanager
    def running(*parts: str):  # with cpu_offload: these models' weights on the GPU for the block
        weights = [t for p in parts if p in models for t in (*models[p].parameters(), *models[p].buffers())]
        for t in weights if cpu_offload else ():
            tracker.count(t, "weights")
        yield
        for t in weights if cpu_offload else ():
            tracker.forget(t)

    with FakeTensorMode(), tracker, torch.no_grad():
        models = _frozen_models(configs, dtype, tracker)
        if cpu_offload:  # in CPU memory until they run
            for t in (t for m in models.values() for t in (*m.parameters(), *m.buffers())):
                tracker.forget(t)
            tracker.peak, tracker.at_peak = 0, dict(tracker.alive)
        tracker.part = "activations"
        with running("text_encoder", "text_encoder_2"):
            context, pooled = _encode(models, torch.zeros(1, 77, dtype=torch.long))  # (1, 77, D), (1, P) or None
        rows = num_images * (2 if guidance else 1)
        context = context.to(dtype).expand(rows, -1, -1)  # (N, 77, D)
        pooled, time_ids = _added_conditioning(models, None if pooled is None else pooled.expand(rows, -1), dtype)
        factor = 2 ** (len(models["vae"].encoder.down_blocks) - 1)
        latents = torch.zeros(rows, 4, height // factor, width // factor, dtype=dtype)
        with running("unet"):
            models["unet"](latents, torch.tensor([999] * rows), context, pooled, time_ids)
        del latents, context, pooled, time_ids
        models["vae"].slicing, models["vae"].tiling = vae_slicing, vae_tiling
        with running("vae"):
            models["vae"].decode(torch.zeros(num_images, 4, height // factor, width // factor))  # (N, 3, H, W) fp32
    setting = f"{num_images} image(s) of {height}x{width}, {str(dtype).removeprefix('torch.')}" + \
              (", classifier-free guidance" if guidance else "") + (", VAE slicing" if vae_slicing else "") + \
              (", VAE tiling" if vae_tiling else "") + (", CPU offload" if cpu_offload else "")
    advice = (["--dtype bf16 (the UNet and text encoders in half the memory)"] if dtype == torch.float32 else []) + \
        ([f"--num {max(1, num_images // 2)}"] if num_images > 1 else []) + \
        ([] if vae_slicing or num_images == 1 else ["--vae-slicing"]) + ([] if vae_tiling else ["--vae-tiling"]) + \
        ([] if cpu_offload else ["--cpu-offload (one model on the GPU at a time)"]) + \
        ["a smaller --height/--width"]
    return MemoryPlan(tracker.peak, tracker.at_peak, time.perf_counter() - start, setting, advice)


