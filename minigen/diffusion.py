"""Diffusion: noise schedules, the forward process and training targets, and the sampling loops.

One `NoiseSchedule` holds the betas and their cumulative products and is shared by training (`add_noise`, `target`,
`min_snr_weight`) and sampling (`sample`). Each sampler is one short function over a `Plan` (the timesteps and noise
levels of one run), in the style of k-diffusion. Every number is computed as diffusers' schedulers compute it, so a
loop over the same model with the same `torch.Generator` gives the same images as a diffusers pipeline:

    schedule = NoiseSchedule.from_config(json.load(open("scheduler/scheduler_config.json")))
    latents = sample(model_fn, (1, 4, 128, 128), schedule, sampler="euler", steps=30, generator=g)

where `model_fn(x_in, t)` returns the model's raw output (epsilon, v or x0 per `schedule.prediction_type`).

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
from tqdm.auto import tqdm

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


# -------------------------------------------------------------------------------------------------------- samplers
# Each sampler takes denoise(x_in, i) -> predicted x_0 (the model called at plan.timesteps[i] on input x_in) and
# returns the final sample. `indices` is the step range (a tqdm bar when asked for).

def to_x0(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The model's prediction of x_0 from its raw output at VP sample x = alpha x_0 + sigma eps."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x_0
        return alpha * x - sigma * output
    return output


def sample_ddpm(denoise, x, plan, generator=None, indices=None):
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2) over the plan's timesteps, variance "fixed_small"."""
    for i in indices if indices is not None else range(len(plan)):
        a_t, a_prev = plan.alphas_cumprod[i], plan.alphas_cumprod_prev[i]
        x0 = denoise(x, i)
        beta = 1 - a_t / a_prev  # the beta of this (possibly strided) step
        # Posterior mean mu~(x_t, x_0) (DDPM eq. 7), written with x_0 as diffusers does.
        x = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if plan.timesteps[i] > 0:  # Patch: diffusers draws (vanishing) noise on the last step too when t_last > 0
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)  # beta~_t (DDPM eq. 7)
            x = x + variance**0.5 * randn(x.shape, generator, x.device, x.dtype)
    return x


def sample_ddim(denoise, x, plan, generator=None, indices=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): deterministic for eta = 0, DDPM-like noise for eta = 1."""
    for i in indices if indices is not None else range(len(plan)):
        a_t, a_prev = plan.alphas_cumprod[i], plan.alphas_cumprod_prev[i]
        x0 = denoise(x, i)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # sigma_t(eta), eq. 16
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * randn(x.shape, generator, x.device, x.dtype)
    return x


def sample_euler(denoise, x, plan, generator=None, indices=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    s = plan.sigmas
    for i in indices if indices is not None else range(len(plan)):
        x0 = denoise(x / (s[i] ** 2 + 1) ** 0.5, i)
        x = x + (x - x0) / s[i] * (s[i + 1] - s[i])  # dx/dsigma = (x - x0) / sigma
    return x


def sample_euler_ancestral(denoise, x, plan, generator=None, indices=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    s = plan.sigmas
    for i in indices if indices is not None else range(len(plan)):
        x0 = denoise(x / (s[i] ** 2 + 1) ** 0.5, i)
        sigma_up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
        sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / s[i] * (sigma_down - s[i])
        x = x + randn(x.shape, generator, x.device, x.dtype) * sigma_up  # drawn on every step, as diffusers does
    return x


def sample_dpmpp_2m(denoise, x, plan, generator=None, indices=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and the last step."""
    alpha = 1 / (plan.sigmas**2 + 1) ** 0.5  # (N + 1,) VP alpha_t; the last is 1
    sigma = plan.sigmas * alpha  # the last is 0
    lam = torch.log(alpha) - torch.log(sigma)  # half log-SNR; +inf at the end
    previous = None
    for i in indices if indices is not None else range(len(plan)):
        x0 = denoise(x, i)
        h = lam[i + 1] - lam[i]
        d = x0
        if previous is not None and i != len(plan) - 1:  # second order: extrapolate x0 from the last two
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + 0.5 * (x0 - previous) / r
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * (torch.exp(-h) - 1.0)) * d
        previous = x0
    return x


SAMPLER_FNS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler,
               "euler_a": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m}


# ---------------------------------------------------------------------------------------------------- guidance
def guided(model_fn, guidance_scale: float, guidance_rescale: float = 0.0):
    """Classifier-free guidance (Ho & Salimans 2022) around a model_fn(x, t) that sees the batch twice.

    model_fn gets (2B, ...) inputs, the unconditional half first (as diffusers' pipelines order the prompt
    embeddings), and the wrapper returns the guided (B, ...) output. Guidance rescale (Lin et al. 2023, eq. 15-16)
    pulls the guided output towards the conditional output's per-sample std. diffusers guides only when the scale
    is above 1; the pipeline decides.
    """

    def guided_fn(x, t):
        uncond, cond = model_fn(torch.cat([x, x]), t).chunk(2)  # (2B, ...) -> (B, ...) twice
        return combine_guidance(uncond, cond, guidance_scale, guidance_rescale)

    return guided_fn


def combine_guidance(uncond, cond, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """uncond + scale (cond - uncond), then optionally pulled towards cond's per-sample std."""
    out = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
    return out


# ------------------------------------------------------------------------------------------------------ the loop
def sample(model_fn, x_or_shape, schedule: NoiseSchedule, sampler: str = "euler", steps: int = 30, *,
           karras: bool = False, eta: float = 0.0, generator=None, init: torch.Tensor | None = None,
           strength: float = 1.0, device=None, dtype=torch.float32, progress: bool = False) -> torch.Tensor:
    """Run `sampler` for `steps` steps and return the final sample x_0.

    model_fn(x_in, t) -> raw model output, called with the input scaled as diffusers' `scale_model_input` does and the
    timestep as diffusers' scheduler lists it (a 0-d tensor). x_or_shape: a shape, or unit-variance starting noise
    (scaled by the sampler's init_noise_sigma, as diffusers scales `latents=`). img2img: give `init` (clean latents)
    and `strength` in (0, 1]; the run skips the first steps and starts from `init` noised to that level.
    The generator is consumed as diffusers' pipelines consume it: the starting noise, then each step's noise.
    """
    if sampler not in SAMPLER_FNS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's; the {sampler!r} sampler does not take it")
    plan = schedule.plan(sampler, steps, karras)
    if init is not None:  # img2img: diffusers' get_timesteps
        start = steps - min(int(steps * strength), steps)
        if start >= steps:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
        plan = plan.from_step(start)
    if schedule.prediction_type == "epsilon" and bool((plan.alpha == 0).any()):
        raise ValueError(f"the {sampler!r} sampler calls the model at zero SNR (alpha_bar = 0, the last timestep of "
                         "a zero-terminal-SNR schedule), where x_0 = (x - eps) / 0 cannot come from an epsilon "
                         "prediction (diffusers returns NaN); such models predict v (Lin et al. 2023, section 3.2), "
                         "else sample with euler, euler_a or dpmpp_2m (sigma ~4096 there)")
    if init is not None:  # img2img: `init` noised to the level of the first step left
        device = device or init.device
        noise = randn(init.shape, generator, device, dtype)
        if sampler in ("euler", "euler_a"):
            x = init.to(device, dtype) + plan.sigmas[0] * noise  # VE
        else:
            x = plan.alpha[0] * init.to(device, dtype) + plan.sigma[0] * noise  # VP
    elif isinstance(x_or_shape, torch.Tensor):
        x = x_or_shape.to(device or x_or_shape.device, dtype) * plan.init_noise_sigma
    else:
        x = randn(tuple(x_or_shape), generator, device, dtype) * plan.init_noise_sigma
    alpha, sigma = plan.alpha.to(x.device), plan.sigma.to(x.device)
    timesteps = plan.timesteps.to(x.device)

    def denoise(x_in, i):
        return to_x0(model_fn(x_in, timesteps[i]), x_in, alpha[i], sigma[i], schedule.prediction_type)

    step_range = tqdm(range(len(plan)), desc=sampler, disable=not progress)
    extra = {"eta": eta} if sampler == "ddim" else {}
    return SAMPLER_FNS[sampler](denoise, x, plan, generator, step_range, **extra)
