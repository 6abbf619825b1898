"""A DCGAN run's settings (`GANConfig`): one field per `train_gan.py` flag, each checked when the config is made, so
presets and resumed settings are checked too."""

from __future__ import annotations

from dataclasses import dataclass

from .. import cli
from . import augment, dcgan

LOSSES = ("bce", "wgan-gp", "hinge")
# Fields that fix the shapes of the saved tensors: a checkpoint resumes only with the same values.
ARCHITECTURE_FIELDS = ("size", "nz", "ngf", "ndf", "g_act", "d_norm", "spectral_norm", "optimizer")
# The allowed values of GANConfig's numbers (see cli.check_fields); betas, lr_d and the label ranges are checked apart.
NUMBER_RANGES = {
    "nz": (1, None), "ngf": (1, None), "ndf": (1, None), "label_flip": (0, 1), "gp_lambda": (0, None),
    "n_critic": (1, None), "lr": cli.POSITIVE, "alpha": (0, 1), "eps": (0, None), "decay_steps": (0, None),
    "decay_rate": cli.POSITIVE, "batch": (1, None), "epochs": (1, None), "seed": cli.SEED_RANGE, "grid": (1, None),
    "save_every": (1, None), "fid_every": (0, None), "fid_samples": (2, None), "ema_halflife": (0, None),
}


@dataclass
class GANConfig:
    """Every knob of a run; `train_gan.py` has one flag per field (underscores become dashes)."""
    data: str = "twemoji"            # built-in dataset name (twemoji, met) or a folder of images
    size: tuple[int, int] = (64, 64)  # height, width
    hflip: bool = False
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    g_act: str = "relu"               # relu or leaky (seed 002 v2)
    d_norm: str = "auto"              # batch, layer, none; auto = batch, layer for wgan-gp, none with spectral_norm
    spectral_norm: bool = False       # spectral normalization of D's convolutions (Miyato et al. 2018)
    loss: str = "bce"                 # bce, wgan-gp, hinge
    real_label: tuple[float, float] = (1.0, 1.0)  # BCE targets drawn uniformly from these ranges (label smoothing)
    fake_label: tuple[float, float] = (0.0, 0.0)
    label_flip: float = 0.0           # probability of swapping a sample's real and fake targets (BCE)
    gp_lambda: float = 10.0
    n_critic: int = 1                 # discriminator steps per generator step
    optimizer: str = "adam"           # adam or rmsprop
    lr: float = 2e-4
    lr_d: float | None = None         # discriminator learning rate; default: lr
    betas: tuple[float, float] = (0.5, 0.999)
    alpha: float = 0.99               # RMSprop's smoothing constant
    eps: float = 1e-8
    decay_steps: int = 0              # lr * decay_rate ** (step / decay_steps); 0 = constant lr
    decay_rate: float = 1.0
    ema_halflife: float = 0.0         # sample from an average of G's weights with this half-life in G steps; 0 = off
    diffaugment: str = ""             # transforms before every D call, e.g. "translation,cutout" (minigen.gan.augment)
    batch: int = 128
    epochs: int = 5
    seed: int = 0
    grid: int = 64                    # images in the per-epoch grid
    save_every: int = 1               # epochs between checkpoints (the last epoch is always saved)
    out: str = "runs/gan"
    device: str = "cpu"
    channels_last: bool = False
    sync_bn: bool = False             # under torchrun: batch norm over the global batch, not each rank's own rows
    fid_every: int = 0                # epochs between FIDs of samples vs the training set (minigen.gan.fid); 0 = off
    fid_samples: int = 1000           # generated images per FID, from one fixed noise seed
    fid_dims: int = 2048              # Inception features: 64, 192, 768 or 2048
    fid_weights: str = ""             # Inception weights file; "" = the usual lookup (minigen.fid.inception.find_weights)

    def __post_init__(self):
        self.size, self.real_label, self.fake_label, self.betas = (
            tuple(self.size), tuple(self.real_label), tuple(self.fake_label), tuple(self.betas))
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose {', '.join(LOSSES)}")
        if self.optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose adam or rmsprop")
        if self.d_norm == "auto":
            # WGAN-GP's penalty is per sample, so its critic uses layer norm (Gulrajani et al. 2017); SN-GAN's
            # discriminator has no feature norm, the spectral norm is its only normalization (Miyato et al. 2018).
            self.d_norm = "layer" if self.loss == "wgan-gp" else "none" if self.spectral_norm else "batch"
        if self.loss == "wgan-gp" and self.d_norm == "batch":
            raise ValueError("wgan-gp needs --d-norm layer or none: the gradient penalty is per sample, "
                             "and batch norm mixes the samples of a batch")
        cli.check_fields(self, NUMBER_RANGES)
        if self.lr_d is not None:
            cli.check_positive("--lr-d", self.lr_d)
        for beta in self.betas:
            cli.check_number("--betas", beta, 0, 1)
        for name in ("real_label", "fake_label"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a range LOW HIGH within [0, 1], got {lo} {hi}")
        augment.parse_policy(self.diffaugment)
        dcgan.stages_for(*self.size)  # refuses unsupported sizes before any data is read
