"""Diffusion without a model: `schedule` (noise schedules, the forward process, training targets, the plan of one
sampling run), `samplers` (DDPM, DDIM, Euler, Euler ancestral, DPM++ 2M; classifier-free guidance), `names` (A1111's
and ComfyUI's sampler names). Imports nothing of minigen's: any model that predicts noise can use it.
"""
