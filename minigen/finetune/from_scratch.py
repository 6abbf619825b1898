"""Training a Stable Diffusion from scratch (`train_sd.py`, `make sd-demo`) in two stages, both run by the LoRA
trainer's loop (trainer.py: its data, checkpoints, exact resume, Ctrl-C, progress bar and torchrun serve
these too); what differs is what trains and the loss.

Stage "vae", the autoencoder alone (Kingma & Welling 2014; the KL-regularised autoencoder of Rombach et al. 2022,
sec. 3 and appendix G, without its perceptual and adversarial terms):

    posterior = Enc(x);  z = mean + std * eps;  x_hat = Dec(z)                  x: (B, 3, H, W) in [-1, 1]
    loss      = mean |x - x_hat|  +  vae_mse_weight * mean (x - x_hat)^2
                +  kl_weight * KL(N(mean, std^2) || N(0, I)) / latent elements
    then scaling_factor = 1 / std(z) over the training set, so the diffusion stage sees latents of unit variance
    (LDM's sec. G: SD 1.x's 0.18215 was found the same way).

Stage "unet", the UNet and the text encoder together, every weight trained (Ho et al. 2020's epsilon loss on the
frozen VAE's cached latents, LDM's cross-attention conditioning): LoRATrainer.loss unchanged. Caption dropout
(captions replaced by "") teaches the unconditional prediction classifier-free guidance needs (Ho & Salimans 2022).
With --colour-captions each caption that names no colour gets its image's colour in front, measured from its
pixels by the colour test's judge (minigen/colours.py): "grinning face" -> "yellow grinning face".

The run folder holds vae/ and unet/ (each stage's checkpoint, log.jsonl, loss.png, samples/), vae/model.safetensors
(the trained VAE with the still-random UNet and text encoder: the second stage's starting point), and at the end
model.safetensors (an SD 1.x single file) and model/ (a diffusers folder): sample.py, train_lora.py, eval.py,
merge.py and diffusers' StableDiffusionPipeline take either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cli, distributed
from .buckets import prepare_image
from ..captions import CaptionedImage
from ..colours import colour_caption
from ..images import open_rgb
from ..plot import save_grid
from ..sd.configs import PRESETS
from .config import LoRATrainConfig
from .data import TrainingSet
from .trainer import LoRATrainer

STAGES = ("vae", "unet")
SCALE_IMAGES = 1024  # images whose latents set the VAE's scaling factor


@dataclass
class SDTrainConfig(LoRATrainConfig):
    """A from-scratch run's settings: LoRATrainConfig's (epochs, lr, batch: the UNet stage's) and the VAE stage's.
    `out` is the run folder; `stage` is where the run stands (the stage a checkpoint was saved in)."""
    preset: str = "emoji-sd1"  # the architecture (minigen/sd/configs.py), built with random weights from --seed
    stage: str = "vae"
    vae_epochs: int = 4
    vae_lr: float = 1e-3
    vae_batch: int = 32
    kl_weight: float = 1e-3
    vae_mse_weight: float = 0.0  # a squared-error term beside the L1: weighs the large errors (a whole red area off)
    colour_captions: bool = False  # each caption gets its image's colour measured from pixels (minigen/colours.py)

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        cli.check_fields(self, {"vae_epochs": (1, None), "vae_batch": (1, None), "vae_lr": cli.POSITIVE,
                                "kl_weight": (0, None), "vae_mse_weight": (0, None)})


def vae_model_path(cfg: SDTrainConfig) -> Path:
    return Path(cfg.out) / "vae" / "model.safetensors"


def stage_settings(cfg: SDTrainConfig) -> SDTrainConfig:
    """The settings the loop reads in cfg.stage: where it writes, what model it starts from, its numbers."""
    root = Path(cfg.out)
    if cfg.stage == "vae":  # no text, no validation prompts; pixels cached (see PixelSet)
        return dataclasses.replace(cfg, out=str(root / "vae"), model=f"random:{cfg.preset}@{cfg.seed}",
                                   epochs=cfg.vae_epochs, lr=cfg.vae_lr, batch=cfg.vae_batch, caption_dropout=0.0,
                                   train_text_encoder=False, cache_latents="memory", validation_prompts=[],
                                   mixed_precision="no")
    return dataclasses.replace(cfg, out=str(root / "unet"), model=str(vae_model_path(cfg)), train_text_encoder=True,
                               cache_latents="memory")


class PixelSet(TrainingSet):
    """The VAE stage's training set: each image's pixels (3, H, W) in [-1, 1], prepared once and kept in memory;
    no latents (the VAE is what trains) and no text."""

    def cache_latents(self) -> None:
        self.pixels = [prepare_image(open_rgb(e.item.path), e.bucket, flip=False).pixels for e in self.examples]

    def cache_text(self) -> dict:
        return {}


class FromScratchTrainer(LoRATrainer):
    """Every weight of the VAE (stage "vae") or of the UNet and text encoder (stage "unet"), through LoRATrainer's
    loop. cfg: the run's settings (saved in checkpoints as they are, so a resumed run knows both stages')."""
    KIND, CLI = "sd", "train_sd.py"

    def __init__(self, cfg: SDTrainConfig, **kwargs):
        self.run_settings = cfg
        super().__init__(stage_settings(cfg), **kwargs)

    def settings_to_save(self) -> dict:
        return dataclasses.asdict(self.run_settings)

    def prepare_trainable(self) -> dict[str, torch.nn.Module]:
        for model in self.model.models().values():
            model.requires_grad_(False)
        trained = {"vae": self.model.vae} if self.cfg.stage == "vae" else \
            {"unet": self.model.unet, "te1": self.model.text_encoder}
        for model in trained.values():
            model.requires_grad_(True)
        return trained

    def training_set(self, items: list[CaptionedImage]) -> TrainingSet:
        if self.cfg.stage == "vae":
            return PixelSet(self.cfg, self.model, items, self.progress)
        if self.cfg.colour_captions:
            items = [dataclasses.replace(i, caption=colour_caption(i.caption, open_rgb(i.path))) for i in items]
        return TrainingSet(self.cfg, self.model, items, self.progress)

    def loss(self, batch: list[int], generators: list[torch.Generator], global_size: int) -> torch.Tensor:
        if self.cfg.stage == "unet":
            return super().loss(batch, generators, global_size)
        x = torch.stack([self.data.pixels[i] for i in batch]).to(self.device)  # (B, 3, H, W)
        posterior = self.model.vae.encode(x)
        eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators])
        z = posterior.mean + posterior.std * eps.to(self.device)  # the reparameterisation trick, (B, 4, h, w)
        x_hat = self.model.vae.decode(z)
        error = x_hat - x
        reconstruction = error.abs().mean(dim=(1, 2, 3)) + self.cfg.vae_mse_weight * (error ** 2).mean(dim=(1, 2, 3))
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean(dim=(1, 2, 3))
        return (reconstruction + self.cfg.kl_weight * kl).sum() / global_size

    def validate(self) -> None:
        if self.cfg.stage == "unet":
            return super().validate()
        if not distributed.is_main():
            return
        x = torch.stack(self.data.pixels[:8]).to(self.device)  # the same 8 images every epoch
        vae = self.model.vae.eval()
        with torch.no_grad():
            x_hat = vae.decode(vae.encode(x).mean).clamp(-1, 1)
        vae.train()
        folder = self.out / "samples"  # top row: the images; bottom row: their reconstructions
        save_grid(torch.cat([x, x_hat]).cpu(), folder / f"epoch_{self.epoch:04d}.png", nrow=len(x))
        self.draw_progress(folder)

    @torch.no_grad()
    def latent_scale(self) -> float:
        """1 / std of the latents of the first SCALE_IMAGES training images (LDM's rescaling, appendix G)."""
        vae = self.model.vae.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        latents = [vae.encode(torch.stack(self.data.pixels[k:k + 64]).to(self.device)).sample(generator)
                   for k in range(0, min(SCALE_IMAGES, len(self.data.pixels)), 64)]
        return 1.0 / torch.cat(latents).float().std().item()

    def save_result(self, final: bool) -> None:
        """The VAE stage: vae/model.safetensors (whole model, the VAE's scaling factor set). The UNet stage: the run
        folder's model.safetensors and model/ (a diffusers folder)."""
        if not final or not distributed.is_main():
            return
        if self.cfg.stage == "vae":
            scale = self.latent_scale()
            self.model.configs["vae"]["scaling_factor"] = self.model.vae.scaling_factor = scale
            self.model.save_single_file(vae_model_path(self.run_settings))
            print(f"sd: VAE trained; latent scaling factor {scale:.4f}; {vae_model_path(self.run_settings)}")
            return
        root = Path(self.run_settings.out)
        self.model.save_single_file(root / "model.safetensors")
        self.model.save_diffusers(root / "model")
