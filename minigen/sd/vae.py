"""The Stable Diffusion VAE: diffusers' AutoencoderKL, images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8).

`encode` gives a diagonal Gaussian over latents; diffusion runs on `sample() * scaling_factor` (0.18215 for SD 1/2,
0.13025 for SDXL) and `decode` takes latents already divided by it. The VAEs overflow in fp16, so it stays fp32
unless asked.
`vae.slicing = True` decodes and encodes a batch one image at a time; `vae.tiling = True` decodes and encodes images
larger than the config's `sample_size` in overlapping tiles (`tiles.py`), as diffusers' enable_slicing/enable_tiling.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from .tiles import tiled

EPS = 1e-6  # the VAE's GroupNorm epsilon (diffusers' resnet_eps for the autoencoder)


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; `moments` (B, 2C, h, w) holds mean then logvar."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Patch: drawn where the generator lives, then moved: a CPU generator gives the same latents on any device.
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)  # (B, C, h, w)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class VAEAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, residual (the mid block's attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class CoderBlock(nn.Module):
    """One resolution level of the encoder or decoder: resnets, then an optional down- or upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                                                    groups, EPS) for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = resampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, channels: list[int], layers: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            CoderBlock(channels[max(i - 1, 0)], c, layers, groups, "down" if i < len(channels) - 1 else None)
            for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, channels: list[int], layers: int, groups: int):
        super().__init__()
        up = channels[::-1]  # from the lowest resolution up
        self.conv_in = nn.Conv2d(latent_channels, up[0], 3, padding=1)
        self.mid_block = MidBlock(up[0], groups)
        self.up_blocks = nn.ModuleList([
            CoderBlock(up[max(i - 1, 0)], c, layers + 1, groups, "up" if i < len(up) - 1 else None)
            for i, c in enumerate(up)])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=EPS)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The VAE. `config` is a diffusers `vae/config.json` dict (see `configs.py`)."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = dict(config)
        channels, layers = list(config["block_out_channels"]), config["layers_per_block"]
        latent, groups = config["latent_channels"], config["norm_num_groups"]
        self.scaling_factor = config.get("scaling_factor", 0.18215)  # diffusers' default when a config lacks it
        self.encoder = Encoder(config["in_channels"], latent, channels, layers, groups)
        self.decoder = Decoder(latent, config["out_channels"], channels, layers, groups)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.slicing = self.tiling = False
        sample_size = config.get("sample_size", 32)  # diffusers' default; a [h, w] list tiles by its first side
        self.tile_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size  # pixels
        self.tile_latents = self.tile_size // 2 ** (len(channels) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> distribution over latents (B, 4, H/8, W/8), not yet scaled."""
        return DiagonalGaussian(torch.cat([self.in_tiles(self.moments, x, self.tile_size, self.tile_latents)
                                           for x in self.slices(images)]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w), already divided by scaling_factor -> images (B, 3, 8h, 8w), about [-1, 1]."""
        return torch.cat([self.in_tiles(self.pixels, z, self.tile_latents, self.tile_size)
                          for z in self.slices(latents)])

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, 3, H, W) -> mean and logvar (b, 8, H/8, W/8)."""
        return self.quant_conv(self.encoder(images))

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (b, 4, h, w) -> images (b, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(latents))

    def slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return batch.split(1) if self.slicing else (batch,)

    def in_tiles(self, coder, x: torch.Tensor, tile: int, out_tile: int) -> torch.Tensor:
        """coder(x), in overlapping tiles of side `tile` when tiling and x is larger than one."""
        if self.tiling and max(x.shape[2:]) > tile:
            return tiled(coder, x, tile, out_tile)
        return coder(x)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode, sample, decode: a reconstruction."""
        return self.decode(self.encode(images).sample(generator))
