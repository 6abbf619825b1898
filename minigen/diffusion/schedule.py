"""Diffusion's noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021's cosine; Lin et al. 2023's zero terminal
SNR), the forward process and training targets, and the plan of one sampling run; `samplers.py` runs the loops.

One `NoiseSchedule` holds the betas and their cumulative products and is shared by training (`add_noise`, `target`,
`min_snr_weight`) and sampling (`samplers.sample`, over a `Plan`: the timesteps and noise levels of one run).

Notation: VP ("variance preserving") samples are x_t = alpha_t * x0 + sigma_t * eps with alpha_t^2 + sigma_t^2 = 1 and
alpha_t^2 = alphas_cumprod[t]; VE ("variance exploding", Karras et al.) samples are x = x0 + sigma * eps with
sigma = sigma_t / alpha_t. DDPM, DDIM and DPM++ step in VP space, Euler in VE space. A zero-terminal-SNR schedule
(`rescale_betas_zero_snr`, Lin et al. 2023) ends at alpha_T = 0, sigma = inf: Euler and DPM++ start from a finite
stand-in for it, as diffusers does (`ve_sigmas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
KARRAS_SAMPLERS = ("euler", "dpmpp_2m")  # the samplers that take Karras sigmas (as diffusers' schedulers do)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --------------------------------------------------------------------------------------------------- noise schedules
def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose alphas_cumprod follow cos^2 ("Improved DDPM", Nichol & Dhariwal 2021, eq. 17), clipped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The beta_t of one of BETA_SCHEDULES, float32 as diffusers builds them."""
    if kind == "linear":  # DDPM paper
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if kind in ("squaredcos_cap_v2", "cosine"):
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alphas_cumprod is exactly 0 (zero terminal SNR), the first unchanged.

    "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023, Algorithm 1): sqrt(alpha_bar_t)
    is shifted so its last value is 0 and scaled so its first keeps its value, then turned back into betas. The last
    beta becomes 1: x_T is pure noise, as sampling assumes. Same float32 operations, in the same order, as diffusers.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,) sqrt(alpha_bar_t)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))  # (T,) from sqrt(alpha_bar_0) down to 0
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # undo the cumprod
    return 1 - alphas


def ve_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The VE noise level sqrt((1 - alpha_bar) / alpha_bar) of each training timestep, in float32 as diffusers does.

    At zero terminal SNR the last alpha_bar is 0 and its sigma infinite; Euler and DPM-Solver start from that sigma,
    so diffusers' schedulers lift it to 2**-24 (fp16's smallest subnormal): a finite first sigma of ~4096. DDPM and
    DDIM step with alpha_bar itself, 0 included, as diffusers' do.
    """
    if alphas_cumprod[-1] == 0:
        alphas_cumprod = torch.cat([alphas_cumprod[:-1], torch.tensor([2.0**-24])])
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # (n,) float64


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the given sigmas, interpolating linearly in log(sigma)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (n,)
    dists = log_sigma - log_sigmas[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
                     points: int | None = None, round_linspace: bool = True) -> np.ndarray:
    """The first `steps` of `points` (default `steps`) timesteps spread over training time, high to low.

    "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023, table 2) names the spacings.
    DPM-Solver lays out steps + 1 points and drops the last (t = 0); Euler keeps linspace's fractional timesteps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    T, n = num_train_timesteps, points or steps
    if spacing == "trailing":  # always `steps` intervals, the first ending at T - 1
        return (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        if not round_linspace:
            return ts[::-1][:steps].astype(np.float32)
        ts = ts.round()
    else:  # leading
        ts = np.arange(0, n) * (T // n) + steps_offset
    return ts[::-1][:steps].astype(np.int64)


@dataclass
class NoiseSchedule:
    """The forward process q(x_t | x_0) of DDPM (Ho et al. 2020) and the settings a sampler needs; defaults are SDXL's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM's last step lands on alphas_cumprod[0] instead of 1
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023): x_T carries no signal at all

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}; expected one of {SPACINGS}")
        self.betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)  # (T,)
        if self.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) alpha_bar_t; the last may be 0
        self.sigmas = ve_sigmas(self.alphas_cumprod)  # (T,) always finite

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Read a diffusers `scheduler_config.json` (any of its schedulers); refuse options minigen does not implement."""
        unsupported = {"trained_betas": None, "clip_sample": False, "thresholding": False,
                       "use_exponential_sigmas": False, "use_beta_sigmas": False,
                       "timestep_type": "discrete", "interpolation_type": "linear", "final_sigmas_type": "zero"}
        for key, supported in unsupported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"scheduler option {key}={config[key]!r} is not supported (only {supported!r})")
        fields = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "timestep_spacing", "steps_offset", "set_alpha_to_one", "rescale_betas_zero_snr")
        return cls(**{k: config[k] for k in fields if k in config})

    # ------------------------------------------------------------------------------ training: q(x_t | x_0), targets
    def _at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] shaped to broadcast over `like`: (B,) -> (B, 1, ..., 1)."""
        a = self.alphas_cumprod.to(like.device, like.dtype)[t.to(like.device)].flatten()
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4); t is (B,) integer timesteps."""
        a = self._at(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict at x_t: the noise, the velocity v (Salimans & Ho 2022) or x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a = self._at(t, x0)
            return a**0.5 * noise - (1 - a) ** 0.5 * x0
        return x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of integer timesteps t; 0 at the last timestep of a
        zero-terminal-SNR schedule (1 - alpha_bar_t is never 0: alpha_bar_0 < 1)."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def min_snr_weight(self, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """Per-sample MSE weight of Min-SNR-gamma (Hang et al. 2023) for this schedule's prediction type: (B,).

        The weight of the x_0 loss is min(SNR, gamma); an epsilon or v loss is that times the factor between the
        losses (1 / SNR, 1 / (SNR + 1)). At zero SNR (zero terminal SNR's last timestep) v's weight is 0, and
        epsilon's min(SNR, gamma) / SNR is taken at its limit, 1, instead of 0 / 0.
        """
        snr = self.snr(t)
        if self.prediction_type == "epsilon":
            return torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR; gamma / 0 = inf clamps to 1
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    # ------------------------------------------------------------------------------------------- sampling: a plan
    def plan(self, sampler: str, steps: int, karras: bool = False) -> "Plan":
        """The timesteps and noise levels of one sampling run, laid out as diffusers' scheduler for `sampler` does."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if karras and sampler not in KARRAS_SAMPLERS:
            raise ValueError(f"Karras sigmas are available for {' and '.join(KARRAS_SAMPLERS)}, not {sampler!r}")
        T, spacing, offset = self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        train_sigmas = self.sigmas.numpy()  # (T,) float32
        if sampler in ("ddpm", "ddim"):
            ts = spaced_timesteps(T, steps, spacing, offset)
            a = self.alphas_cumprod
            if sampler == "ddpm":  # lands on the next timestep of the run, and on alpha_bar = 1 after the last
                prev = np.append(ts[1:], -1)
                final = torch.tensor(1.0)
            else:  # Patch: diffusers' DDIM steps back by T // steps whatever the spacing; kept for equal images
                prev = ts - T // steps
                final = torch.tensor(1.0) if self.set_alpha_to_one else a[0]
            a_t = a[torch.from_numpy(ts)]  # (N,)
            a_prev = torch.stack([a[p] if p >= 0 else final for p in prev.tolist()])  # (N,)
            sig = torch.cat([((1 - a_t) / a_t) ** 0.5, torch.zeros(1)])  # inf at SNR 0: these step with a_t itself
            return Plan(torch.from_numpy(ts), sig, a_t**0.5, (1 - a_t) ** 0.5, a_t, a_prev, 1.0)
        if sampler == "dpmpp_2m":
            ts = spaced_timesteps(T, steps, spacing, offset, points=steps + 1)
            if karras:  # over the whole training range; timesteps rounded to integers
                sig = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
                ts = sigma_to_t(sig, np.log(train_sigmas)).round().astype(np.int64)
            else:
                sig = np.interp(ts, np.arange(T), train_sigmas)
            ts = torch.from_numpy(ts)
            init_noise_sigma = 1.0  # VP: x_T is unit noise
        else:  # euler, euler_a
            ts = spaced_timesteps(T, steps, spacing, offset, round_linspace=False).astype(np.float32)
            sig = np.interp(ts, np.arange(T), train_sigmas)
            if karras:  # between the run's own first and last sigma; fractional timesteps
                sig = karras_sigmas(float(sig[-1]), float(sig[0]), steps)
                ts = sigma_to_t(sig, np.log(train_sigmas))
            ts = torch.from_numpy(ts.astype(np.float32))
        sig = torch.from_numpy(np.append(sig, 0.0).astype(np.float32))  # (N + 1,) ending at sigma = 0
        if sampler != "dpmpp_2m":  # VE: x_T = sigma_max * noise, or its VP-equivalent size for "leading"
            s_max = sig.max()
            init_noise_sigma = s_max if spacing in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
        alpha = 1 / (sig[:-1] ** 2 + 1) ** 0.5  # (N,) VP alpha_t, sigma_t of each step's sigma
        return Plan(ts, sig, alpha, sig[:-1] * alpha, None, None, init_noise_sigma)


@dataclass
class Plan:
    """One sampling run: N timesteps, their noise levels, and the scale of the starting noise."""

    timesteps: torch.Tensor  # (N,) what the model is called with (int64, or float32 for Euler)
    sigmas: torch.Tensor  # (N + 1,) VE noise level before each step, then 0
    alpha: torch.Tensor  # (N,) VP alpha_t of each step
    sigma: torch.Tensor  # (N,) VP sigma_t of each step
    alphas_cumprod: torch.Tensor | None  # (N,) DDPM/DDIM: alpha_bar at each step ...
    alphas_cumprod_prev: torch.Tensor | None  # (N,) ... and at the point each step lands on
    init_noise_sigma: float | torch.Tensor  # x_T = init_noise_sigma * unit noise

    def __len__(self) -> int:
        return len(self.timesteps)

    def from_step(self, start: int) -> "Plan":
        """The rest of the run from step `start` on (img2img starts part-way)."""

        def rest(v):
            return None if v is None else v[start:]

        return Plan(rest(self.timesteps), rest(self.sigmas), rest(self.alpha), rest(self.sigma),
                    rest(self.alphas_cumprod), rest(self.alphas_cumprod_prev), self.init_noise_sigma)


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit Gaussian noise drawn as diffusers' randn_tensor draws it: on the generator's device, one per generator."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=on, dtype=dtype).to(device)


