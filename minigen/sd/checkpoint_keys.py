"""The keys of a single-file Stable Diffusion checkpoint (the layout of the original LDM/SGM code, which A1111 and
ComfyUI read): each part's prefix by family, and the keys that no model part holds."""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."

VAE_PREFIX = "first_stage_model."

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L

BIGG_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG

SD1_TEXT_PREFIX = "cond_stage_model.transformer."

SD2_TEXT_PREFIX = "cond_stage_model.model."

REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

# family -> {part: single-file prefix}; a text prefix ending in "transformer." holds the HF layout, "model." OpenCLIP's
FAMILY_PREFIXES = {
    "sd1": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SD1_TEXT_PREFIX},
    "sd2": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SD2_TEXT_PREFIX},
    "sdxl": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": BIGG_PREFIX},
    "sdxl-refiner": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder_2": REFINER_TEXT_PREFIX},
}

# Keys real single files carry that no minigen/diffusers module holds: dropped when loading.
IGNORED_SUFFIXES = ("embeddings.position_ids",  # a buffer older transformers saved
                    "model.logit_scale")  # CLIP's contrastive temperature, unused for text encoding

IGNORED_KEYS = {  # the original LDM training state: its noise schedule buffers, EMA bookkeeping, markers
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred", "ztsnr"}  # and every model_ema.* key (see ignored_key)

# SD 2's text encoder is OpenCLIP ViT-H without its last block (it reads the penultimate layer); diffusers drops
# block 23 of a file, so minigen does too.
SD2_UNUSED_BLOCK = "transformer.resblocks.23."


def ignored_key(key: str) -> bool:
    """True for a single-file key that no model part holds (see IGNORED_KEYS, IGNORED_SUFFIXES)."""
    return key in IGNORED_KEYS or key.startswith("model_ema.") or (
        key.startswith(("cond_stage_model.", "conditioner.")) and key.endswith(IGNORED_SUFFIXES)) or \
        key.startswith(SD2_TEXT_PREFIX + SD2_UNUSED_BLOCK) or key == SD2_TEXT_PREFIX + "text_projection"
