"""Stable Diffusion XL: UNet, VAE, text encoders, tokenizer, key maps and loader."""
