"""Training Stable Diffusion's parts with one loop: `config` (a run's settings, learning-rate schedules), `data`
(images, captions, buckets, cached latents; `buckets`: aspect-ratio buckets), `trainer` (the LoRA trainer of seeds
000, 001 and 003: loss, checkpoints, exact resume, torchrun, validation), `from_scratch` (the same loop training the
VAE, then the UNet and text encoder from random weights: `make sd-demo`), `memory_plan` (a run's GPU memory, measured
on fake tensors before it starts). Imports the shared modules, `diffusion`, `lora` and `sd`.
"""
