"""minigen: a small, readable, pure-PyTorch image-generation library (DCGAN, SDXL + LoRA, samplers, merging, FID)."""

__version__ = "0.1.0"
