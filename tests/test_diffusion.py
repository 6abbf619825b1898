"""minigen.diffusion.schedule against diffusers' schedulers: schedules, timesteps, q(x_t|x_0), and whole sampling trajectories.

Every sampler runs a full trajectory next to the matching diffusers scheduler loop (set_timesteps, randn *
init_noise_sigma, scale_model_input, model, step with the generator), with the same fixed fake model and a generator
of the same seed on each side. Tolerances are for fp32: minigen writes some formulas in another (equivalent) order,
so the two agree to rounding (~1e-7 relative per operation), which 25 steps grow to at most 6e-7 of the
output scale (measured); the tests allow 5e-6.
"""

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from diffusers.training_utils import compute_snr

from close import assert_close_to_scale
from minigen.diffusion.samplers import guided, sample
from minigen.diffusion.schedule import NoiseSchedule, randn

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
# SDXL's scheduler_config.json (the keys that matter); clip_sample/set_alpha_to_one as SDXL ships them.
SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
            set_alpha_to_one=False)
# Zero terminal SNR (Lin et al. 2023) as zero-terminal-SNR models (NoobAI-XL v-pred, say) are sampled: rescaled betas,
# v-prediction, trailing spacing (the first step at t = 999, SNR 0).
ZTSNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")


def reference(sampler, karras=False, **overrides):
    config = {**SDXL, **overrides}
    if karras:
        config["use_karras_sigmas"] = True
    return SCHEDULERS[sampler].from_config(config), NoiseSchedule.from_config(config)


def fake_model(calls):
    """A fixed smooth function of (x, t) standing in for a UNet; records the timesteps it is called with."""

    def model_fn(x, t):
        calls.append(t.clone())
        t = t.float()
        return 0.8 * x * torch.cos(t / 700) + 0.3 * torch.sin(2 * x + t / 250)

    return model_fn


def diffusers_loop(scheduler, model_fn, shape, steps, seed, **step_kwargs):
    """What StableDiffusionXLPipeline does around its UNet (no guidance)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model_fn(x_in, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def assert_same_trajectory(sampler, karras, eta, steps, **config):
    """minigen's `sample` and the diffusers loop with the same config: the model sees the same timesteps (with the
    same dtype: int64, or float32 for Euler) and the final samples agree to fp32 rounding."""
    scheduler, schedule = reference(sampler, karras, **config)
    shape, seed = (2, 4, 8, 6), 1234
    ref_calls, our_calls = [], []
    expected = diffusers_loop(scheduler, fake_model(ref_calls), shape, steps, seed,
                              **({"eta": eta} if sampler == "ddim" else {}))
    got = sample(fake_model(our_calls), shape, schedule, sampler, steps, karras=karras, eta=eta,
                 generator=torch.Generator("cpu").manual_seed(seed))
    assert [t.dtype for t in our_calls] == [t.dtype for t in ref_calls]
    torch.testing.assert_close(torch.stack(our_calls), torch.stack(ref_calls), rtol=0, atol=0)
    # Measured: at most 6e-7 of the output scale (DDPM bit-exact); 5e-6 leaves a 10x margin.
    assert_close_to_scale(got, expected, 5e-6, min_scale=1.0)


def assert_same_plan(sampler, karras, step_counts, **config):
    """The timesteps of each run length equal diffusers' (bit for bit), and for the sigma-based samplers the sigmas
    and the starting noise's scale too."""
    scheduler, schedule = reference(sampler, karras, **config)
    for steps in step_counts:
        scheduler.set_timesteps(steps)
        plan = schedule.plan(sampler, steps, karras)
        assert plan.timesteps.dtype == scheduler.timesteps.dtype, (steps, plan.timesteps.dtype)
        torch.testing.assert_close(plan.timesteps, scheduler.timesteps, rtol=0, atol=0, msg=f"steps={steps}")
        if sampler in ("euler", "euler_a", "dpmpp_2m"):
            torch.testing.assert_close(plan.sigmas, scheduler.sigmas, rtol=0, atol=0, msg=f"steps={steps}")
            torch.testing.assert_close(torch.as_tensor(plan.init_noise_sigma), torch.as_tensor(
                scheduler.init_noise_sigma, dtype=torch.float32), rtol=0, atol=0)


TRAJECTORIES = [("ddpm", False, 0.0), ("ddim", False, 0.0), ("ddim", False, 0.7), ("euler", False, 0.0),
                ("euler", True, 0.0), ("euler_a", False, 0.0), ("dpmpp_2m", False, 0.0), ("dpmpp_2m", True, 0.0)]
PLANS = [("ddpm", False), ("ddim", False), ("euler", False), ("euler", True), ("euler_a", False),
         ("dpmpp_2m", False), ("dpmpp_2m", True)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,karras,eta", TRAJECTORIES)
def test_trajectory_matches_diffusers(sampler, karras, eta, prediction_type):
    assert_same_trajectory(sampler, karras, eta, 25, prediction_type=prediction_type)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler,karras", PLANS)
def test_timesteps_and_sigmas_match(sampler, karras, spacing):
    assert_same_plan(sampler, karras, (1, 2, 3, 7, 10, 25, 30, 50, 333, 999), timestep_spacing=spacing)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_and_forward_process_match(beta_schedule):
    config = dict(SDXL, beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
    ref, ours = DDPMScheduler.from_config(config), NoiseSchedule.from_config(config)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    v = NoiseSchedule.from_config(dict(config, prediction_type="v_prediction"))
    torch.testing.assert_close(v.target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    assert torch.equal(ours.target(x0, noise, t), noise)
    # Min-SNR-5 weights as diffusers' training scripts compute them from compute_snr.
    snr = compute_snr(ref, t)
    clipped = torch.clamp(snr, max=5.0)
    torch.testing.assert_close(ours.min_snr_weight(t, 5.0), clipped / snr)
    torch.testing.assert_close(v.min_snr_weight(t, 5.0), clipped / (snr + 1))


@pytest.mark.parametrize("sampler,karras,eta", TRAJECTORIES)
def test_zero_terminal_snr_sampling_matches_diffusers(sampler, karras, eta):
    """With rescale_betas_zero_snr each sampler starts from pure noise at SNR 0: DDPM/DDIM at alpha_bar = 0 itself,
    Euler/DPM++ at sigma ~4096 (alpha_bar lifted to 2**-24); timesteps, sigmas and trajectories as diffusers'."""
    assert_same_plan(sampler, karras, (1, 2, 3, 10, 25, 999), **ZTSNR)
    assert_same_trajectory(sampler, karras, eta, 10, **ZTSNR)


def test_zero_terminal_snr_schedule_and_training_targets():
    config = dict(SDXL, **ZTSNR)
    ref, ours = DDPMScheduler.from_config(config), NoiseSchedule.from_config(config)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    # Algorithm 1's two ends: alpha_bar_T = 0, alpha_bar_0 unchanged.
    assert ours.alphas_cumprod[-1] == 0 and ours.alphas_cumprod[0] == NoiseSchedule().alphas_cumprod[0]
    euler = EulerDiscreteScheduler.from_config(config)  # its training sigmas, high to low, then 0
    torch.testing.assert_close(ours.sigmas, euler.sigmas[:-1].flip(0), rtol=0, atol=0)
    assert 4000 < ours.sigmas[-1] < 4200  # sqrt(2**24 - 1): finite

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    assert torch.equal(ours.add_noise(x0, noise, t)[3], noise[3])  # x_T is the noise itself ...
    assert torch.equal(ours.target(x0, noise, t)[3], -x0[3])  # ... and v there is -x_0
    # Min-SNR-5 at SNR 0: v's weight min(SNR, 5) / (SNR + 1) is 0; epsilon's min(SNR, 5) / SNR is its limit 1.
    snr = compute_snr(ref, t)
    assert snr[3] == 0 and ours.snr(t)[3] == 0
    clipped = torch.clamp(snr, max=5.0)
    torch.testing.assert_close(ours.min_snr_weight(t, 5.0), clipped / (snr + 1))
    eps = NoiseSchedule.from_config(dict(config, prediction_type="epsilon"))
    torch.testing.assert_close(eps.min_snr_weight(t, 5.0), torch.cat([clipped[:3] / snr[:3], torch.ones(1)]))


def test_zero_snr_refuses_epsilon_where_it_gives_no_x0():
    """x_0 = (x - eps) / 0 at alpha_bar = 0: DDPM and DDIM reaching t = 999 are refused (diffusers returns NaN);
    Euler's sigma ~4096 keeps it finite, as in diffusers, and img2img that skips t = 999 runs."""
    schedule = NoiseSchedule.from_config({**SDXL, **ZTSNR, "prediction_type": "epsilon"})
    model_fn = fake_model([])
    for sampler in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match="zero SNR.*predict v"):
            sample(model_fn, (1, 4, 8, 8), schedule, sampler, 5)
    assert sample(model_fn, (1, 4, 8, 8), schedule, "euler", 5).isfinite().all()
    assert sample(model_fn, None, schedule, "ddim", 5, init=torch.zeros(1, 4, 8, 8), strength=0.6).isfinite().all()


@pytest.mark.parametrize("config", [{}, ZTSNR], ids=["sdxl", "ztsnr"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers_strength(sampler, config):
    """The SDXL img2img loop: timesteps from get_timesteps(strength), noise drawn first, scheduler.add_noise."""
    scheduler, schedule = reference(sampler, **config)
    steps, strength, seed = 20, 0.6, 7
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    model_fn = fake_model([])
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):  # the sigma-indexed schedulers
        scheduler.set_begin_index(start)
    x = scheduler.add_noise(init, torch.randn(init.shape, generator=generator), timesteps[:1])
    for t in timesteps:
        x = scheduler.step(model_fn(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    got = sample(model_fn, None, schedule, sampler, steps, init=init, strength=strength,
                 generator=torch.Generator("cpu").manual_seed(seed))
    torch.testing.assert_close(got, x, rtol=0, atol=2e-5)


def test_guidance_matches_sdxl_pipeline_formula():
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    x = torch.randn(2, 4, 8, 8)

    def model_fn(x2, t):  # (2B, ...): unconditional half first
        return torch.cat([x2[:2] * 0.5, x2[2:] * 2.0 + 1.0])

    out = guided(model_fn, 7.5, 0.7)(x, torch.tensor(10))
    uncond, cond = x * 0.5, x * 2.0 + 1.0
    expected = rescale_noise_cfg(uncond + 7.5 * (cond - uncond), cond, guidance_rescale=0.7)
    torch.testing.assert_close(out, expected)


def test_noise_is_drawn_as_diffusers_randn_tensor():
    """One generator for the batch, or one per image (per-image seeds), drawn on the generator's device."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (3, 4, 5, 6)
    for seeds in ([11], [11, 12, 13]):
        ours = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        theirs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        one = len(seeds) == 1
        assert torch.equal(randn(shape, ours[0] if one else ours), randn_tensor(shape, theirs[0] if one else theirs))


def test_progress_bar_and_given_noise(capsys):
    """x_or_shape may be the unit starting noise itself (diffusers' `latents=`): scaled by init_noise_sigma."""
    schedule = NoiseSchedule()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    from_noise = sample(fake_model([]), noise, schedule, "euler", 5, progress=True)
    from_seed = sample(fake_model([]), noise.shape, schedule, "euler", 5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(from_noise, from_seed)
    assert "5/5" in capsys.readouterr().err


def test_bad_input_is_refused():
    schedule = NoiseSchedule()
    model_fn = fake_model([])
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model_fn, (1, 4, 8, 8), schedule, sampler="heun")
    with pytest.raises(ValueError, match="steps"):
        sample(model_fn, (1, 4, 8, 8), schedule, steps=0)
    with pytest.raises(ValueError, match="strength"):
        sample(model_fn, None, schedule, init=torch.zeros(1, 4, 8, 8), strength=0.0)
    with pytest.raises(ValueError, match="eta"):
        sample(model_fn, (1, 4, 8, 8), schedule, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="Karras"):
        schedule.plan("ddpm", 10, karras=True)
    with pytest.raises(ValueError, match="clip_sample"):
        NoiseSchedule.from_config(dict(SDXL, clip_sample=True))
    with pytest.raises(ValueError, match="prediction type"):
        NoiseSchedule(prediction_type="flow")
    with pytest.raises(ValueError, match="beta schedule"):
        NoiseSchedule(beta_schedule="sigmoid")
