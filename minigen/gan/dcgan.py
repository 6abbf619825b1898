"""DCGAN (Radford et al. 2015, as in the PyTorch DCGAN tutorial) for any H x W, and the GAN losses.

The generator grows a small base grid by stride-2 transposed convolutions: 64x64 is 4x4 doubled four times; seed 000's
320 high x 480 wide is 10x15 doubled five times. The discriminator mirrors it. `stages_for(H, W)` says which sizes work.

The discriminator returns logits, not probabilities. # Deviation from the tutorial's Sigmoid + BCELoss: BCE on logits
is the same loss computed stably, and WGAN-GP and hinge need the raw score anyway. D(x) = sigmoid(logit) is logged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_BASE = 16  # the largest side of the base grid; a bigger grid would need a giant first layer
MIN_STAGES = 3


def stages_for(height: int, width: int) -> tuple[int, int, int]:
    """(base height, base width, number of stride-2 stages) for an image size, or a ValueError saying why not.

    Halve both sides while both are even and the smaller is above 4; the base grid left must have sides <= 16
    and be reached in at least 3 stages. E.g. 64x64 -> 4x4 in 4; 320x480 -> 10x15 in 5; 72x72 -> 9x9 in 3.
    """
    h, w, n = height, width, 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 4:
        h, w, n = h // 2, w // 2, n + 1
    if max(h, w) > MAX_BASE or n < MIN_STAGES:
        raise ValueError(
            f"image size {height}x{width} (height x width) is not supported: the DCGAN doubles a base grid with "
            f"sides <= {MAX_BASE} at least {MIN_STAGES} times, but {height}x{width} halves only to {h}x{w} in {n} "
            f"stage(s). Use sides of the form base * 2**n, e.g. 32x32, 64x64, 128x128, 96x96, 64x96, 320x480")
    return h, w, n


def init_dcgan(module: nn.Module) -> None:
    """The DCGAN paper's init: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":  # layer norm over (C, H, W): what WGAN-GP's critic uses instead of batch norm
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: choose batch, layer or none")


class Generator(nn.Module):
    """z (B, nz) -> image (B, 3, H, W) in [-1, 1]. Channels ngf * 2**(n-1) at the base grid, halving each stage."""

    def __init__(self, size: tuple[int, int] = (64, 64), nz: int = 100, ngf: int = 64, activation: str = "relu"):
        super().__init__()
        bh, bw, n = stages_for(*size)
        self.size, self.nz = tuple(size), nz
        if activation not in ("relu", "leaky"):
            raise ValueError(f"unknown generator activation {activation!r}: choose relu or leaky")

        def act():
            return nn.ReLU(True) if activation == "relu" else nn.LeakyReLU(0.2, True)

        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 512, 256, 128, 64 for 64x64, ngf 64
        # A transposed conv with the base grid as kernel turns the (B, nz, 1, 1) noise into (B, C, bh, bw).
        layers = [nn.ConvTranspose2d(nz, widths[0], (bh, bw), 1, 0, bias=False), nn.BatchNorm2d(widths[0]), act()]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), act()]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])  # (B, nz) -> (B, 3, H, W)


class Discriminator(nn.Module):
    """image (B, 3, H, W) -> logit (B,). Mirrors the generator; LeakyReLU(0.2); no norm on the first layer.

    spectral_norm: divide every convolution's weight by its largest singular value, estimated by one power iteration
    per forward pass (Miyato et al. 2018, "Spectral Normalization for GANs"), which bounds D's Lipschitz constant.
    """

    def __init__(self, size: tuple[int, int] = (64, 64), ndf: int = 64, norm: str = "batch",
                 spectral_norm: bool = False):
        super().__init__()
        bh, bw, n = stages_for(*size)
        widths = [ndf * 2 ** i for i in range(n)]  # e.g. 64, 128, 256, 512
        layers = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), norm_layer(norm, c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, (bh, bw), 1, 0, bias=False)]  # (B, C, bh, bw) -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan)
        if spectral_norm:  # after the init: the normalization rescales whatever weights it is given
            for layer in self.net:
                if isinstance(layer, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # (B,)


# ---------------------------------------------------------------------------------------------------------------------
# Losses. Each takes discriminator logits; `d_loss` the real and fake scores, `g_loss` the scores of fresh fakes.


def bce_d_loss(real: torch.Tensor, fake: torch.Tensor, real_target: torch.Tensor,
               fake_target: torch.Tensor) -> torch.Tensor:
    """-[t log D(x) + (1-t) log(1-D(x))] averaged, for reals and fakes, summed (the tutorial's errD_real + errD_fake).

    Targets may be soft (label smoothing: reals in [0.7, 1], fakes in [0, 0.3]) or flipped.
    """
    return (F.binary_cross_entropy_with_logits(real, real_target)
            + F.binary_cross_entropy_with_logits(fake, fake_target))


def bce_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating generator loss, with hard targets 1 (smoothing is for D only)."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def wgan_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Critic loss E[D(G(z))] - E[D(x)] (Gulrajani et al. 2017, Algorithm 1; the penalty is added separately)."""
    return fake.mean() - real.mean()


def wgan_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]; also the generator loss of the hinge GAN."""
    return -fake.mean()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Lim and Ye 2017; as in SAGAN, BigGAN)."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None, mix: torch.Tensor | None = None) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per sample (WGAN-GP). mix: the
    weights e, (B, 1, 1, 1), when the caller draws them (default: from `generator`)."""
    e = (torch.rand(real.shape[0], 1, 1, 1, generator=generator) if mix is None else mix).to(real.device)
    x_hat = (e * real + (1 - e) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)  # (B, 3, H, W)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def soft_labels(n: int, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n targets uniform in [low, high] (label smoothing given as a range; low == high gives hard labels)."""
    return low + (high - low) * torch.rand(n, generator=generator)
