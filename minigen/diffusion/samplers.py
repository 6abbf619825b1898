"""The sampling loops: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), Euler and Euler ancestral (Karras et al.
2022), DPM-Solver++ 2M (Lu et al. 2022), each one short function over a `schedule.Plan`, in the style of
k-diffusion, and classifier-free guidance (Ho & Salimans 2022) around the model:

    schedule = NoiseSchedule.from_config(json.load(open("scheduler/scheduler_config.json")))
    latents = sample(model_fn, (1, 4, 128, 128), schedule, sampler="euler", steps=30, generator=g)

where `model_fn(x_in, t)` returns the model's raw output (epsilon, v or x0 per `schedule.prediction_type`). Every
number is computed as diffusers' schedulers compute it, so a loop over the same model with the same
`torch.Generator` gives the same images as a diffusers pipeline.

Each sampler takes denoise(x_in, i) -> predicted x_0 (the model called at plan.timesteps[i] on input x_in) and
returns the final sample. `indices` is the step range (a tqdm bar when asked for).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .schedule import SAMPLERS, NoiseSchedule, randn


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
