"""Stable Diffusion configurations, as the config.json files of a diffusers folder hold them.

`SDXL_BASE` is Stable Diffusion XL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0): its `unet/`, `vae/`,
`text_encoder/`, `text_encoder_2/` and `scheduler/` configs; `SD15` is Stable Diffusion 1.5 (one text encoder,
CLIP ViT-L), `SD21` Stable Diffusion 2.1 768-v (OpenCLIP ViT-H, v-prediction). The `tiny*` presets keep each
family's structure at toy widths, for tests and smoke runs: SDXL's three levels of which two use cross-attention,
transformer depth 2 at the lowest level, head dim (16) different from every channel count, two text encoders of
different widths, the second with 10 layers (diffusers' single-file detection looks for `resblocks.9`); SD 1.x's
four levels with 1x1-conv projections and one head count everywhere; SD 2.x's linear projections and v-prediction;
the SDXL refiner's bigG alone, four levels and five time ids ("tiny-refiner"). All keep the real vocabulary size
and 77 positions.

Every function returns a fresh dict, so callers may change it.
"""

from __future__ import annotations

import copy

_UNET_BASE = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' name; it is the number of heads (head dim 64)
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled bigG) + 6 time ids * 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_VAE_BASE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,  # SDXL's VAE overflows in fp16
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# transformers' CLIPTextConfig fields. The real files say eos_token_id 2 (a leftover of the original export); with
# it transformers pools at the argmax token id, which is the end-of-text token 49407 for CLIP's vocabulary.
_CLIP_TEXT_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "vocab_size": 49408,
}

_TEXT_ENCODER_BASE = {  # OpenAI CLIP ViT-L/14 text tower
    **_CLIP_TEXT_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

_TEXT_ENCODER_2_BASE = {  # OpenCLIP ViT-bigG/14 text tower, with its projection
    **_CLIP_TEXT_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

_SCHEDULER_BASE = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SDXL_BASE = {
    "unet": _UNET_BASE,
    "vae": _VAE_BASE,
    "text_encoder": _TEXT_ENCODER_BASE,
    "text_encoder_2": _TEXT_ENCODER_2_BASE,
    "scheduler": _SCHEDULER_BASE,
}

TINY = {
    "unet": {
        **_UNET_BASE,
        "block_out_channels": [32, 64, 96],
        "attention_head_dim": [2, 4, 6],  # heads; head dim 16 at every level
        "transformer_layers_per_block": [1, 1, 2],
        "layers_per_block": 2,
        "cross_attention_dim": 32 + 64,  # text_encoder + text_encoder_2 widths
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,  # text_encoder_2 projection + 6 time ids * 8
        "norm_num_groups": 32,
        "sample_size": 16,
    },
    "vae": {
        **_VAE_BASE,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "sample_size": 32,
    },
    "text_encoder": {**_TEXT_ENCODER_BASE, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                     "num_hidden_layers": 3, "projection_dim": 32},
    "text_encoder_2": {**_TEXT_ENCODER_2_BASE, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                       "num_hidden_layers": 10, "projection_dim": 32},
    "scheduler": _SCHEDULER_BASE,
}

# The SDXL refiner's structure at toy widths: bigG alone, so the context is its width (the real one: 1280) and the
# added conditioning its projection plus five time ids (original h, w, crop top, left, aesthetic score; the real
# one: 1280 + 5 * 256 = 2560); four levels with attention in the middle two, one transformer depth everywhere (4 in
# the real one), the mid block at the last level's width.
TINY_REFINER = {
    "unet": {
        **TINY["unet"],
        "block_out_channels": [32, 64, 96, 96],
        "attention_head_dim": [2, 4, 6, 6],  # heads; head dim 16 at every level
        "transformer_layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 64,  # text_encoder_2's width
        "projection_class_embeddings_input_dim": 32 + 5 * 8,  # text_encoder_2 projection + 5 time ids * 8
    },
    "vae": TINY["vae"],
    "text_encoder_2": TINY["text_encoder_2"],
    "scheduler": _SCHEDULER_BASE,
}

# ------------------------------------------------------------------------------------------- SD 1.x and 2.x

_UNET_SD15 = {
    **{k: v for k, v in _UNET_BASE.items() if k not in ("addition_embed_type_num_heads", "addition_time_embed_dim",
                                                         "projection_class_embeddings_input_dim")},
    "addition_embed_type": None,
    "attention_head_dim": 8,  # 8 heads at every level (head dim 40, 80, 160)
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "sample_size": 64,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,  # 1x1 convolutions into and out of each transformer
}

_UNET_SD21 = {**_UNET_SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
              "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}

_VAE_SD = {**_VAE_BASE, "scaling_factor": 0.18215, "sample_size": 512}

_TEXT_ENCODER_SD21 = {  # OpenCLIP ViT-H/14 text tower without its last layer (SD 2 reads the penultimate one)
    **_CLIP_TEXT_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}

_SCHEDULER_SD15 = {**_SCHEDULER_BASE, "_class_name": "PNDMScheduler"}
_SCHEDULER_SD21 = {**_SCHEDULER_BASE, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

SD15 = {"unet": _UNET_SD15, "vae": _VAE_SD, "text_encoder": _TEXT_ENCODER_BASE, "scheduler": _SCHEDULER_SD15}
SD21 = {"unet": _UNET_SD21, "vae": {**_VAE_SD, "sample_size": 768}, "text_encoder": _TEXT_ENCODER_SD21,
        "scheduler": _SCHEDULER_SD21}

_TINY_SD_VAE = {**TINY["vae"], "scaling_factor": 0.18215}
TINY_SD1 = {
    "unet": {**_UNET_SD15, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": 2, "cross_attention_dim": 32,
             "sample_size": 16},
    "vae": _TINY_SD_VAE,
    "text_encoder": TINY["text_encoder"],
    "scheduler": _SCHEDULER_SD15,
}
TINY_SD2 = {
    "unet": {**_UNET_SD21, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4],
             "cross_attention_dim": 48, "sample_size": 16},
    "vae": _TINY_SD_VAE,
    "text_encoder": {**_TEXT_ENCODER_SD21, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                     "num_hidden_layers": 4, "projection_dim": 32},
    "scheduler": _SCHEDULER_SD21,
}

# A small SD 1.x-family model to train from scratch on 32x32 emoji on a CPU (`make sd-demo`, train_sd.py): a VAE
# that scales by 4 (8x8x4 latents), a three-level UNet with cross-attention at the upper two, a 4-layer CLIP-L-
# structure text encoder 128 wide (the real vocabulary and 77 positions). The VAE's scaling_factor is a
# placeholder: the VAE stage sets it to 1 / std of the latents it makes (Rombach et al. 2022, sec. 3.1 and G).
EMOJI_SD1 = {
    "unet": {**_UNET_SD15, "block_out_channels": [64, 128, 192], "attention_head_dim": 4, "cross_attention_dim": 128,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "sample_size": 8},
    "vae": {**_VAE_SD, "block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "sample_size": 32},
    "text_encoder": {**_TEXT_ENCODER_BASE, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                     "num_hidden_layers": 4, "projection_dim": 128},
    "scheduler": _SCHEDULER_SD15,
}

# The same at 64x64 for one GPU (configs/sd_demo_cuda.conf): 16x16x4 latents, a wider UNet and text encoder.
EMOJI_SD1_LARGE = {
    "unet": {**EMOJI_SD1["unet"], "block_out_channels": [128, 256, 384], "attention_head_dim": 8,
             "cross_attention_dim": 256, "sample_size": 16},
    "vae": {**EMOJI_SD1["vae"], "block_out_channels": [64, 128, 128], "layers_per_block": 2, "sample_size": 64},
    "text_encoder": {**EMOJI_SD1["text_encoder"], "hidden_size": 256, "intermediate_size": 1024,
                     "num_attention_heads": 4, "num_hidden_layers": 6, "projection_dim": 256},
    "scheduler": _SCHEDULER_SD15,
}

PRESETS = {"sdxl-base": SDXL_BASE, "tiny": TINY, "tiny-refiner": TINY_REFINER, "sd15": SD15, "sd21": SD21,
           "tiny-sd1": TINY_SD1, "tiny-sd2": TINY_SD2, "emoji-sd1": EMOJI_SD1,
           "emoji-sd1-large": EMOJI_SD1_LARGE}


def vae_scale_of(vae_config: dict) -> int:
    """Pixels per latent: the VAE halves the size once per level but the last (8 for every SD VAE, 2 for tiny)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def default_size(configs: dict[str, dict]) -> int:
    """The side of the images a model was made for, diffusers' default height and width: the UNet's latent size times
    the VAE's scale (SDXL 128 x 8 = 1024, SD 1.5 64 x 8 = 512, SD 2.1 96 x 8 = 768, random:tiny 16 x 2 = 32)."""
    return configs["unet"]["sample_size"] * vae_scale_of(configs["vae"])


def get_config(preset: str = "sdxl-base", part: str | None = None) -> dict:
    """A fresh copy of a preset's configs ({"unet", "vae", "text_encoder", "text_encoder_2" (SDXL), "scheduler"}) or
    one part."""
    if preset not in PRESETS:
        raise KeyError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    configs = PRESETS[preset]
    if part is not None and part not in configs:
        raise KeyError(f"unknown part {part!r}; choose from {sorted(configs)}")
    return copy.deepcopy(configs if part is None else configs[part])
