"""The training set of a LoRA run, ready for the loop (`trainer.py`).

Each captioned image goes to the aspect-ratio bucket nearest its shape (a batch is one bucket, so one size); its
latents are encoded once and cached when crops and flips are fixed (`--cache-latents memory|disk`), and every
distinct caption goes through the frozen text encoders once when they are not trained. Under torchrun each rank
encodes its share of both caches and all ranks gather the whole. What is random about one image (its crop and flip,
its latent sample) draws from a generator of its own, passed in: the same draws whichever rank encodes it, and a
resumed run repeats them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed
from .buckets import make_buckets, nearest_bucket, prepare_image
from ..captions import CaptionedImage, captioned_images, dreambooth_images
from ..datasets import CAPTIONS_FROM_NAMES, resolve_dataset
from ..images import open_rgb, parse_size
from ..io import load_safetensors, save_safetensors
from ..sd.model import StableDiffusion
from ..sd.pipeline import encode_prompt, time_ids
from ..training import epoch_seed

TEXT_BATCH = 16  # captions through the text encoders at once while caching


@dataclass
class Example:
    """One training image ready for the loop: its latents (cached) or pixels' recipe, caption, time ids, weight."""
    item: CaptionedImage
    bucket: tuple[int, int]
    latents: torch.Tensor | None = None  # (4, H/8, W/8) scaled, when cached
    time_ids: torch.Tensor | None = None  # (6,) for the cached crop; SDXL only (SD 1/2 have no micro-conditioning)


def load_examples(cfg) -> list[CaptionedImage]:
    """The images and captions `cfg` (a LoRATrainConfig) names: a captioned folder, or DreamBooth's instance (and
    class) images with their prompts."""
    root = resolve_dataset(cfg.data)
    if cfg.instance_prompt:
        class_root = resolve_dataset(cfg.class_data) if cfg.class_data else None
        return dreambooth_images(root, cfg.caption_prefix + cfg.instance_prompt, class_root, cfg.class_prompt)
    return captioned_images(root, cfg.caption_prefix, cfg.caption_fallback,
                            caption_of_name=CAPTIONS_FROM_NAMES.get(str(cfg.data)))


def make_batches(buckets: list[tuple[int, int]], batch: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches: indices grouped by bucket (a batch is one size), shuffled within and across buckets."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in torch.randperm(len(buckets), generator=generator).tolist():
        groups.setdefault(buckets[i], []).append(i)
    batches = [g[k:k + batch] for g in groups.values() for k in range(0, len(g), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def size_multiple(model: StableDiffusion) -> int:
    """Image sides this model can take are multiples of this: the VAE's downsampling times the UNet's (32 for SDXL,
    64 for SD 1/2); other sides fail deep in the UNet, where its skip connections no longer fit."""
    vae_levels = len(model.vae.config["block_out_channels"]) - 1
    unet_levels = len(model.unet.config["block_out_channels"]) - 1
    return 2 ** (vae_levels + unet_levels)


def check_sizes(cfg, model: StableDiffusion) -> None:
    """--bucket-step and --validation-size must fit the model (see size_multiple)."""
    multiple = size_multiple(model)
    if cfg.bucket_step % multiple:
        raise ValueError(f"--bucket-step must be a multiple of {multiple} for this model, got {cfg.bucket_step}")
    h, w = parse_size(cfg.validation_size or cfg.resolution)
    if cfg.validation_prompts and (h % multiple or w % multiple):
        raise ValueError(f"--validation-size (default: --resolution) must be a multiple of {multiple} for this "
                         f"model, got {h}x{w}")


class TrainingSet:
    """The examples of a run in their buckets, with what can be computed once cached (see the module docstring)."""

    def __init__(self, cfg, model: StableDiffusion, items: list[CaptionedImage], progress: bool = True):
        self.cfg, self.model, self.progress = cfg, model, progress
        self.device = model.unet.conv_in.weight.device
        self.added_conditioning = model.text_encoder_2 is not None  # pooled prompt and time ids: SDXL only
        h, w = parse_size(cfg.resolution)
        self.buckets = make_buckets(h * w, cfg.bucket_step, min_side=min(256, h, w))
        self.examples = self.bucketed(items)
        if cfg.cache_latents != "off":
            self.cache_latents()
        self.text_cache = None if cfg.train_text_encoder else self.cache_text()

    def __len__(self) -> int:
        return len(self.examples)

    def bucketed(self, items: list[CaptionedImage]) -> list[Example]:
        cfg = self.cfg
        examples, upscaled = [], []
        for item in items:
            img = open_rgb(item.path)
            if img is None:
                continue
            if min(img.size) < cfg.bucket_step:
                raise ValueError(f"{item.path} is {img.width}x{img.height}, smaller than one {cfg.bucket_step} px "
                                 "bucket step; remove it or lower --bucket-step")
            bucket = nearest_bucket(img.height, img.width, self.buckets)
            if img.height < bucket[0] or img.width < bucket[1]:
                upscaled.append(item.path.name)
            examples.append(Example(item, bucket))
        if not examples:
            raise ValueError(f"no readable images in {cfg.data}")
        if upscaled:
            warnings.warn(f"{len(upscaled)} of {len(examples)} images are smaller than their bucket at "
                          f"--resolution {cfg.resolution} and are scaled up (blurrier), e.g. {upscaled[:3]}",
                          stacklevel=3)
        return examples

    def encode_images(self, examples: list[Example], generators: list[torch.Generator]
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Open, crop and VAE-encode a batch of one bucket, each image's flip, crop and latent sample drawn from its own
        generator: scaled latents (B, 4, h, w) and time ids (B, 6; None for SD 1/2)."""
        cfg, vae = self.cfg, self.model.vae
        prepared = []
        for e, g in zip(examples, generators):
            flip = cfg.flip and bool(torch.rand((), generator=g) < 0.5)
            prepared.append(prepare_image(open_rgb(e.item.path), e.bucket, cfg.random_crop, flip, g))
        pixels = torch.stack([p.pixels for p in prepared]).to(self.device, vae.post_quant_conv.weight.dtype)
        with torch.no_grad():
            posterior = vae.encode(pixels)
            noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators])
            latents = posterior.mean + posterior.std * noise.to(posterior.mean)  # a sample, (B, 4, h, w)
        ids = torch.stack([time_ids(p.original_size, p.crop_top_left, e.bucket) for p, e in zip(prepared, examples)]) \
            if self.added_conditioning else None
        return latents.float() * vae.scaling_factor, ids

    def cache_latents(self) -> None:
        """Encode every image once (its crop and flip then fixed); with cache_latents=disk, reuse out/cache (when every
        rank finds it; rank 0 writes it). Each rank encodes its share, then all gather the whole."""
        cfg, examples = self.cfg, self.examples
        path = Path(cfg.out) / "cache" / "latents.safetensors"
        key = json.dumps([[str(e.item.path), e.bucket] for e in examples] + ["per-image-seed", cfg.seed, cfg.flip])
        cached, meta = load_safetensors(path) if cfg.cache_latents == "disk" and path.is_file() else ({}, {})
        if distributed.all_true(meta.get("key") == key, "every rank to look for the latent cache"):
            for i, e in enumerate(examples):
                e.latents, e.time_ids = cached[f"{i}.latents"], cached.get(f"{i}.time_ids")
            return
        start, mine = distributed.share(examples)
        encoded = {}
        for i, e in enumerate(tqdm(mine, desc="caching latents", unit="img", disable=not self.progress, leave=False)):
            generator = torch.Generator().manual_seed(distributed.derived_seed(cfg.seed, "latents", start + i))
            latents, ids = self.encode_images([e], [generator])
            encoded[start + i] = (latents[0].cpu(), None if ids is None else ids[0])
        for part in distributed.gather_objects(encoded, "the other ranks' share of the latent cache"):
            for i, (latents, ids) in part.items():
                examples[i].latents, examples[i].time_ids = latents, ids
        if cfg.cache_latents == "disk" and distributed.is_main():
            tensors = {f"{i}.{k}": getattr(e, k) for i, e in enumerate(examples) for k in ("latents", "time_ids")
                       if getattr(e, k) is not None}
            save_safetensors(tensors, path, {"key": key})

    @torch.no_grad()
    def cache_text(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each distinct caption (and "" for caption dropout) through the frozen text encoders once: {caption: (context
        (77, D), pooled (P,) or None for SD 1/2)}."""
        captions = sorted({e.item.caption for e in self.examples} | ({""} if self.cfg.caption_dropout else set()))
        _, mine = distributed.share(captions, TEXT_BATCH)  # whole chunks: each caption in the batch it has alone
        encoded = {}
        for k in range(0, len(mine), TEXT_BATCH):
            chunk = list(mine[k:k + TEXT_BATCH])
            context, pooled = self.encode(chunk)
            encoded |= {c: (context[i].cpu(), None if pooled is None else pooled[i].cpu()) for i, c in enumerate(chunk)}
        parts = distributed.gather_objects(encoded, "the other ranks' share of the caption cache")
        return {caption: value for part in parts for caption, value in part.items()}

    def latents(self, examples: list[Example], generators: list[torch.Generator]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's scaled latents (B, 4, h, w) on the device and time ids (B, 6; None for SD 1/2): cached, or
        encoded now."""
        if examples[0].latents is None:
            return self.encode_images(examples, generators)
        latents = torch.stack([e.latents for e in examples]).to(self.device)
        return latents, torch.stack([e.time_ids for e in examples]) if self.added_conditioning else None

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions through the text encoder(s) at the run's CLIP skip, with gradients (a text-encoder LoRA trains
        through this): context (B, 77, D), pooled (B, P) or None for SD 1/2."""
        return encode_prompt(self.model, captions, clip_skip=self.cfg.clip_skip, warn_truncated=False, keep_grad=True)

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context (B, 77, D) and pooled (B, P; None for SD 1/2) of the captions: cached, or through the (trained)
        encoders."""
        if self.text_cache is None:
            return self.encode(captions)
        context = torch.stack([self.text_cache[c][0] for c in captions]).to(self.device)
        if not self.added_conditioning:
            return context, None
        return context, torch.stack([self.text_cache[c][1] for c in captions]).to(self.device)

    def sample_generators(self, epoch: int, batch_index: int, first: int, count: int) -> list[torch.Generator]:
        """The generators of samples first..first+count-1 of global batch `batch_index` of `epoch` (noise, timestep,
        caption dropout, crop): one each, seeded by those numbers only, not by the rank that draws them."""
        return [torch.Generator().manual_seed(distributed.derived_seed(self.cfg.seed, epoch, batch_index, first + k))
                for k in range(count)]

    def resume_position(self, epoch: int, done: int, ranks: int, batches_then: int) -> int:
        """The batch to continue `epoch` from when its global batches have changed size (--batch x ranks) since
        `done` of `batches_then` were trained: as far through the epoch. The new order differs, so the rest of this
        epoch may repeat or miss a few images (a warning says so); the epochs after it are whole."""
        if not done:
            return 0
        now = len(self.epoch_batches(epoch, ranks))
        warnings.warn(f"resuming with global batches of {self.cfg.batch * ranks} images (--batch x ranks), not the "
                      f"checkpoint's: epoch {epoch + 1} continues {done}/{batches_then} of the way through in a new "
                      "order, so it may repeat or miss a few images (not an exact resume)", stacklevel=3)
        return min(now, round(done * now / batches_then))

    def epoch_batches(self, epoch: int, ranks: int = 1) -> list[list[int]]:
        """The global batches of `epoch` (each --batch x `ranks` images of one bucket, for the ranks to split), from a
        generator of its own: a resumed run rebuilds the same order, and so does a run whose batch x ranks is the
        same (2 ranks of batch 2 see what 1 rank of batch 4 sees)."""
        order = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
        return make_batches([e.bucket for e in self.examples], self.cfg.batch * ranks, order)
