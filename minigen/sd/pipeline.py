"""Stable Diffusion text-to-image and img2img (SD 1.x, 2.x, SDXL and its refiner): prompts -> text encoder(s) ->
the sampling loop over the UNet -> VAE decode -> images.

Every step is the one diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (the refiner:
StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score) takes, in the same order, so that for the same
model, settings and `torch.Generator` the images are the same:

    pipe = Pipeline.from_pretrained("stable-diffusion-xl-base-1.0/", dtype=torch.bfloat16, device="cuda")
    images = pipe("a photo of an astronaut riding a horse on mars", steps=30, guidance_scale=5.0,
                  generator=torch.Generator("cpu").manual_seed(0))        # (B, H, W, 3) uint8
    save_images(images, "out/", "astronaut")

1. Prompt. SD 1.x/2.x: the encoder's last hidden state after its final layer norm (B, 77, 768 or 1024); with CLIP
   skip N (A1111's count: 2 = the penultimate layer, what anime models were trained with) the hidden state N - 1
   layers earlier, layer-normed. The negative prompt is the encoding of "" when none is given.
   SDXL: each encoder's penultimate hidden state, not normed, concatenated (B, 77, 768 + 1280); the pooled prompt is
   the second encoder's projected end-of-text state (B, 1280). With no negative prompt, the negative embeddings are
   zeros (`force_zeros_for_empty_prompt`, SDXL's default), not the encoding of "".
   SDXL refiner: bigG alone, its penultimate hidden state (B, 77, 1280) and pooled projection; with no negative
   prompt, the encoding of "" (its model_index.json turns force_zeros_for_empty_prompt off). The refiner is meant
   for img2img on a base model's image (strength ~0.3); diffusers' denoising_start/denoising_end hand-over of
   latents between base and refiner is not implemented.
2. Micro-conditioning (SDXL only; "SDXL", Podell et al. 2023, sec. 2.2): the UNet also sees (original height, width,
   crop top, left, target height, width); by default the generated size with no crop. The refiner sees an aesthetic
   score in place of the target size: by default 6 with the prompt and 2.5 with the negative prompt (diffusers'),
   steering towards the look of highly rated training images and away from that of poorly rated ones.
3. Latents: unit noise from the generator, (B, 4, H/8, W/8), scaled by the sampler; then the sampler's loop
   (`minigen.diffusion.samplers.sample`) with classifier-free guidance over the batch [negative, positive]. The model predicts
   noise or v (SD 2.x 768-v), as its scheduler config says.
4. Decode: latents / scaling_factor (0.18215 for SD 1/2, 0.13025 for SDXL) through the VAE in fp32, (x + 1) / 2
   clamped, *255 rounded, uint8.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..diffusion.samplers import guided, sample
from ..diffusion.schedule import KARRAS_SAMPLERS, SAMPLERS, NoiseSchedule, randn
from ..images import to_rgb
from ..atomic import atomic_write
from ..lora.layers import remove_lora
from .lora_reading import load_lora
from .configs import default_size, vae_scale_of
from .convert import unet_name_map
from .detect import FAMILY_NAMES
from .model import RANDOM, StableDiffusion, load_model, read_model_index
from .offload import ModelOffload

VAE_SCALE = 8  # pixels per latent in each direction: every SD VAE halves the size three times
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's defaults (diffusers')


def check_settings(sampler: str, steps: int, height: int | None, width: int | None, num_images: int = 1,
                   vae_scale: int = VAE_SCALE, strength: float = 1.0, karras: bool = False) -> None:
    """Refuse settings that cannot make an image, naming what is wrong, before any model runs. strength: img2img's.
    A size of None is the model's own (`Pipeline.default_size`), fine by construction."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"Karras sigmas are available for {' and '.join(KARRAS_SAMPLERS)}, not {sampler!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    for name, size in (("height", height), ("width", width)):
        if size is not None and (not isinstance(size, int) or size < vae_scale or size % vae_scale):
            raise ValueError(f"{name} must be a positive multiple of {vae_scale} (the VAE's scale), got {size!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {num_images!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if int(steps * strength) < 1:  # diffusers' get_timesteps runs int(steps * strength) of the steps
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run (steps * strength < 1)")


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as floats (6,)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def aesthetic_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                       aesthetic_score: float) -> torch.Tensor:
    """The SDXL refiner's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, aesthetic_score), floats (5,)."""
    return torch.tensor([*original_size, *crop_top_left, aesthetic_score], dtype=torch.float32)


def encode_prompt(model: StableDiffusion, prompts: Sequence[str], *, clip_skip: int = 1, warn_truncated: bool = True,
                  keep_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts through the text encoder(s): context (B, 77, D) and pooled (B, 1280; None for SD 1.x/2.x), in the
    text encoders' dtype. clip_skip: A1111's count, 1 = no skip (see the module's doc).

    Text past 75 tokens is cut off with a warning naming it, as diffusers warns. (diffusers warns only for the
    prompt; minigen also warns for the negative prompt, whose cut-off text is dropped just the same.) LoRA training
    passes `warn_truncated=False` (diffusers' trainer cuts captions silently) and `keep_grad=True` (a text-encoder
    LoRA trains through this); sampling runs without gradients.
    """
    if clip_skip < 1:
        raise ValueError(f"clip skip must be >= 1 (1: no skip, 2: the penultimate layer), got {clip_skip}")
    contexts, out = [], None
    with contextlib.nullcontext() if keep_grad else torch.no_grad():
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            if encoder is None:
                continue
            if clip_skip >= len(encoder.text_model.encoder.layers) + 1:
                raise ValueError(f"clip skip {clip_skip} leaves no layer of a {len(encoder.text_model.encoder.layers)}"
                                 f"-layer text encoder")
            tokens = tokenizer(list(prompts))
            for cut in filter(None, tokens.truncated) if warn_truncated else ():
                warnings.warn("The following part of your input was truncated because CLIP can only handle "
                              f"sequences up to {tokenizer.max_length} tokens: {cut}", stacklevel=3)
            out = encoder(tokens.input_ids.to(encoder.text_model.embeddings.token_embedding.weight.device))
            if model.family.startswith("sdxl"):  # the penultimate layer (or earlier), not final-normed
                contexts.append(out.hidden_states[-1 - clip_skip])  # (B, 77, D_i)
            else:  # the last layer (or earlier), final-normed: diffusers' clip_skip is A1111's minus one
                contexts.append(encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip]))
    pooled = out.text_embeds if model.text_encoder_2 is not None else None  # (B, 1280) from encoder 2
    return torch.cat(contexts, dim=-1), pooled


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded as diffusers' image processor does."""
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()


def next_image_number(folder: str | os.PathLike, stem: str) -> int:
    """One past the highest n of the `<stem>-<n>.png` files already in `folder` (0 when there are none)."""
    numbers = [int(m[1]) for p in Path(folder).glob(f"{glob.escape(stem)}-*.png")
               if (m := re.fullmatch(re.escape(stem) + r"-(\d+)\.png", p.name))]
    return max(numbers, default=-1) + 1


def save_images(images: torch.Tensor, folder: str | os.PathLike, stem: str, first_index: int = 0,
                pnginfo: Callable[[int], object] | None = None) -> list[Path]:
    """Write (B, H, W, 3) uint8 images, image b being batch image `first_index + b`, as `<stem>-<n>.png`: n the batch
    position (`<seed>-000.png`, `-001`, ...) in a folder that has none of these yet, else numbered on past the highest
    there (a new run never replaces an earlier one's images, as A1111 and ComfyUI number on); each atomically; returns
    the paths. pnginfo(i): the PIL `PngInfo` (text chunks) of batch image i (see `minigen.sd.png_info.png_text`)."""
    paths, number = [], max(first_index, next_image_number(folder, stem))
    for b, image in enumerate(images):
        path = Path(folder) / f"{stem}-{number + b:03d}.png"
        with atomic_write(path) as f:
            Image.fromarray(image.numpy()).save(f, format="PNG",
                                                pnginfo=pnginfo(first_index + b) if pnginfo else None)
        paths.append(path)
    return paths


def load_init_image(path: str | os.PathLike, height: int | None = None, width: int | None = None,
                    vae_scale: int = VAE_SCALE) -> torch.Tensor:
    """An img2img starting image as (1, 3, H, W) fp32 in [0, 1], as diffusers' VaeImageProcessor prepares it: resized
    with Lanczos to height x width, each by default its own rounded down to a multiple of `vae_scale`.
    ValueError names the file when it cannot be read or is smaller than one latent."""
    try:
        with Image.open(path) as img:
            img.load()
            # Patch: transparency composited on white and EXIF rotation applied, as everywhere in minigen (diffusers
            # drops the alpha channel and ignores the rotation).
            img = to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # unreadable ones are OSErrors
        raise ValueError(f"--init-image {path}: not a readable image ({e})") from None
    h, w = height or img.height // vae_scale * vae_scale, width or img.width // vae_scale * vae_scale
    if min(h, w) < vae_scale:
        raise ValueError(f"--init-image {path}: {img.width}x{img.height} is smaller than {vae_scale} pixels")
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


class Pipeline:
    """Text to image and img2img with a Stable Diffusion model (see `minigen.sd.model.load_model`).
    force_zeros_for_empty_prompt: zero negative embeddings when no negative prompt is given; by default the family's
    (on for SDXL base, off for the refiner, as their model_index.json say; SD 1.x/2.x always encode "")."""

    def __init__(self, model: StableDiffusion, force_zeros_for_empty_prompt: bool | None = None):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.force_zeros_for_empty_prompt = model.family != "sdxl-refiner" if force_zeros_for_empty_prompt is None \
            else force_zeros_for_empty_prompt
        self.loras = 0  # adapters added so far, each named lora1, lora2, ...
        self.offload: ModelOffload | None = None  # enable_cpu_offload's
        self.lora_summaries: dict[str, str] = {}  # adapter name -> its file's one-line summary (lora_summary)
        self.baked_loras: set[str] = set()  # added with removable=False: in the weights for good

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **load_kwargs) -> "Pipeline":
        """A diffusers folder or a single-file checkpoint (SD 1.x, 2.x, SDXL, the refiner); errors name a missing path
        or another kind of model. A folder's model_index.json sets `force_zeros_for_empty_prompt` (on unless it says
        not, as in diffusers); a single file gets its family's default.
        "random:<preset>" is a random model of a preset's sizes (see `load_model`)."""
        if str(path).startswith(RANDOM):
            return cls(load_model(path, dtype=dtype, device=device, **load_kwargs))
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path}")
        index = read_model_index(path) if path.is_dir() else {}
        force_zeros = index.get("force_zeros_for_empty_prompt", True) if index else None
        return cls(load_model(path, dtype=dtype, device=device, **load_kwargs), force_zeros)

    def add_lora(self, path: str | os.PathLike, multiplier: float = 1.0, allow_pickle: bool = False,
                 removable: bool = True) -> str:
        """Apply a LoRA file (any LoRA-family format, kohya/LyCORIS or diffusers/peft layout; UNet and/or text
        encoders) on top of the model at `multiplier`; several stack, as `sample.py --lora a:0.8 --lora b:0.5` does.
        removable: as its own adapter, which `remove_lora` takes off (plain LoRA/LoCon layers on the fly, the other
        kinds merged with the weights kept aside); else added into the weights for good, nothing kept and nothing
        computed per step (`sample.py`; `lora.applying.add_lora_deltas`). allow_pickle: accept a pickled file (.pt, .bin),
        loaded with weights_only=True. Returns the adapter's name, for `remove_lora` and `lora_summaries`."""
        self.loras += 1
        name = f"lora{self.loras}"
        _, self.lora_summaries[name] = load_lora(path, self.model.lora_components(), name=name, multiplier=multiplier,
                  unet_names=unet_name_map(self.model.unet.config), allow_pickle=allow_pickle,
                  family=self.model.family, removable=removable)
        if not removable:
            self.baked_loras.add(name)
        return name

    def remove_lora(self, name: str) -> None:
        """Take the adapter `add_lora` named `name` off the model: its outputs are the base model's again."""
        if name in self.baked_loras:
            raise ValueError(f"LoRA {name!r} was added into the weights for good (removable=False)")
        for model in self.model.lora_components().values():
            remove_lora(model, name)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent (8 for every SD)."""
        return vae_scale_of(self.model.vae.config)

    @property
    def default_size(self) -> int:
        """The image side when none is given: the model's own, as diffusers takes it (1024 for SDXL, 512 SD 1.5)."""
        return default_size(self.model.configs)

    @property
    def device(self) -> torch.device:
        """Where the drawing runs: the UNet's device, or the GPU models are offloaded to."""
        return self.offload.device if self.offload else self.model.unet.conv_in.weight.device

    def enable_cpu_offload(self, device: str | torch.device) -> None:
        """Keep the models on the CPU and each on `device` only while it runs (minigen/sd/offload.py)."""
        m = self.model
        self.offload = ModelOffload(device)
        for model in (m.text_encoder, m.text_encoder_2, m.unet):
            if model is not None:
                self.offload.add(model, [model])
        self.offload.add(m.vae, [m.vae.encoder, m.vae.decoder, m.vae.quant_conv, m.vae.post_quant_conv])

    def conditioning(self, prompt: str, negative_prompt: str | None, num_images: int, guidance: bool,
                     clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context (N, 77, D) and pooled (N, 1280; None for SD 1.x/2.x) for the UNet: N = num_images, or
        2 * num_images ordered [negative..., positive...] when guiding, as diffusers batches them."""
        context, pooled = encode_prompt(self.model, [prompt], clip_skip=clip_skip)  # (1, 77, D), (1, 1280) | None
        if guidance:
            if negative_prompt is None and self.force_zeros_for_empty_prompt and pooled is not None:
                negative = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                negative = encode_prompt(self.model, [negative_prompt or ""], clip_skip=clip_skip)
            context = torch.cat([negative[0], context])
            pooled = None if pooled is None else torch.cat([negative[1], pooled])
        # (G, ...) -> (G * num_images, ...): each of the G prompts repeated num_images times
        return context.repeat_interleave(num_images, 0), \
            None if pooled is None else pooled.repeat_interleave(num_images, 0)

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, steps: int = 30,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, sampler: str = "euler",
                 karras: bool = False, eta: float = 0.0, height: int | None = None, width: int | None = None,
                 num_images: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, output: str = "uint8",
                 progress: bool = False, embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 init_image: torch.Tensor | None = None, strength: float = 0.3, clip_skip: int = 1,
                 aesthetic_score: float | None = None, negative_aesthetic_score: float | None = None) -> torch.Tensor:
        """Generate `num_images` images of `prompt`: (num_images, height, width, 3) uint8 on the CPU, or with
        output="float" (num_images, 3, height, width) fp32 in [0, 1] (diffusers' output_type="pt").

        clip_skip: A1111's count (1: none; 2: the penultimate layer). original_size, crop_top_left, target_size:
        SDXL's micro-conditioning (ignored by SD 1.x/2.x); the refiner takes aesthetic_score and
        negative_aesthetic_score (default 6.0 and 2.5) in place of target_size (see `added_time_ids`).
        guidance_scale > 1 turns on classifier-free guidance (as in diffusers); guidance_rescale in [0, 1] pulls the
        guided prediction towards the conditional one's std. eta is DDIM's. One generator draws the whole batch's
        noise, as diffusers does; a list gives one generator per image.

        embeddings: (context, pooled) laid out as `conditioning` returns them, used instead of encoding `prompt`
        (which is then ignored); its rows may be different prompts (evaluate.py encodes once and batches prompts).

        init_image: img2img (diffusers' StableDiffusionXLImg2ImgPipeline), (1 or num_images, 3, height, width) in
        [0, 1] (see `load_init_image`); strength in (0, 1] (diffusers' default 0.3) runs the last int(steps * strength)
        steps, starting from the image's latents noised to that step's level. height, width: default the model's own
        size (`default_size`), as in diffusers.
        """
        scale = self.vae_scale
        height, width = height or self.default_size, width or self.default_size
        check_settings(sampler, steps, height, width, num_images, scale, strength if init_image is not None else 1.0,
                       karras)
        if init_image is not None and (init_image.shape[0] not in (1, num_images)
                                       or tuple(init_image.shape[1:]) != (3, height, width)):
            raise ValueError(f"init_image of shape {tuple(init_image.shape)} does not fit {num_images} images of "
                             f"{height}x{width}")
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        unet, vae = self.model.unet, self.model.vae
        guidance = guidance_scale > 1
        ids = self.added_time_ids(num_images, guidance, (height, width), original_size, crop_top_left, target_size,
                                  aesthetic_score, negative_aesthetic_score)  # (N, 6 or 5); None for SD 1.x/2.x
        if embeddings is None:
            context, pooled = self.conditioning(prompt, negative_prompt, num_images, guidance, clip_skip)
        else:
            context, pooled = embeddings
            if context.shape[0] != num_images * (2 if guidance else 1) or \
                    (pooled is not None and pooled.shape[0] != context.shape[0]):
                raise ValueError(f"embeddings of {context.shape[0]} rows do not fit "
                                 f"{num_images} images {'with' if guidance else 'without'} guidance")
        dtype, device = unet.conv_in.weight.dtype, self.device
        context = context.to(device, dtype)
        if pooled is not None:  # SDXL: the pooled prompt and the micro-conditioning
            pooled, ids = pooled.to(device, dtype), ids.to(device, dtype)

        def unet_fn(x, t):  # x (N, 4, h, w) -> predicted noise (or v); latents stay fp32 between steps
            return unet(x.to(dtype), t, context, pooled, ids).float()

        model_fn = guided(unet_fn, guidance_scale, guidance_rescale) if guidance else unet_fn
        shape = (num_images, unet.config["in_channels"], height // scale, width // scale)
        init = None if init_image is None else self.encode_init_image(init_image, num_images, generator)
        latents = sample(model_fn, shape, self.schedule, sampler, steps, karras=karras, eta=eta, init=init,
                         strength=strength, generator=generator, device=device, progress=progress)  # (B, 4, h, w)
        # Patch: decoded in the VAE's own dtype, fp32 by default (diffusers keeps an fp16/bf16 VAE's dtype unless
        # force_upcast); SD's VAEs overflow in fp16, and its cost is small next to the UNet's.
        vae_param = vae.post_quant_conv.weight
        images = vae.decode((latents / vae.scaling_factor).to(vae_param.device, vae_param.dtype))  # (B, 3, H, W)
        images = (images.float() * 0.5 + 0.5).clamp(0, 1).cpu()
        return unit_to_uint8(images) if output == "uint8" else images

    def added_time_ids(self, num_images: int, guidance: bool, size: tuple[int, int],
                       original_size: tuple[int, int] | None, crop_top_left: tuple[int, int],
                       target_size: tuple[int, int] | None, aesthetic_score: float | None,
                       negative_aesthetic_score: float | None) -> torch.Tensor | None:
        """SDXL's micro-conditioning for each row of the batch, ordered as `conditioning` orders them; sizes default
        to the generated `size`. SDXL: (N, 6), the same for negative and positive rows. The refiner: (N, 5), an
        aesthetic score in place of the target size, its negative rows with negative_aesthetic_score and no crop,
        as diffusers' StableDiffusionXLImg2ImgPipeline makes them (its negative_crops_coords_top_left keeps its
        default (0, 0) whatever the crop). None for SD 1.x/2.x, which ignore these settings."""
        family = self.model.family
        if family == "sdxl-refiner" and target_size is not None:
            raise ValueError("target_size: the SDXL refiner is conditioned on an aesthetic score, not a target size")
        if family != "sdxl-refiner" and (aesthetic_score, negative_aesthetic_score) != (None, None):
            raise ValueError(f"aesthetic scores condition the SDXL refiner only, not {FAMILY_NAMES[family]}")
        rows, original_size = num_images * (2 if guidance else 1), original_size or size
        if family == "sdxl":
            return time_ids(original_size, crop_top_left, target_size or size).expand(rows, -1)  # (N, 6)
        if family != "sdxl-refiner":
            return None
        positive = aesthetic_time_ids(original_size, crop_top_left,
                                      AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score)
        if not guidance:
            return positive.expand(rows, -1)  # (N, 5)
        negative = aesthetic_time_ids(original_size, (0, 0), NEGATIVE_AESTHETIC_SCORE
                                      if negative_aesthetic_score is None else negative_aesthetic_score)
        return torch.stack([negative, positive]).repeat_interleave(num_images, 0)  # (2 * num_images, 5)

    def encode_init_image(self, images: torch.Tensor, num_images: int,
                          generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """img2img's clean latents (num_images, 4, h, w) fp32, scaled, as diffusers' prepare_latents makes them: a
        sample of the VAE's latent distribution drawn from the generator (before the starting noise), the image
        repeated over the batch; with one generator per image, each copy is encoded and sampled with its own."""
        vae = self.model.vae
        param = vae.post_quant_conv.weight
        x = (images * 2 - 1).to(param.device, param.dtype)  # [0, 1] -> [-1, 1]
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_images:
                raise ValueError(f"got {len(generator)} generators for a batch of {num_images}")
            x = x.expand(num_images, -1, -1, -1)
            pairs = [(x[i:i + 1], g) for i, g in enumerate(generator)]
        else:
            pairs = [(x, generator)]
        latents = []
        for image, g in pairs:
            dist = vae.encode(image)
            # drawn as diffusers' randn_tensor draws (on the generator's device), not as DiagonalGaussian.sample
            latents.append(dist.mean + dist.std * randn(dist.mean.shape, g, param.device, param.dtype))
        latents = torch.cat(latents).float() * vae.scaling_factor
        return latents.repeat(num_images // latents.shape[0], 1, 1, 1)
