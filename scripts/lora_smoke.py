"""`make lora-smoke`: the whole LoRA training loop on the CPU in a few minutes, on a random tiny SDXL-architecture
model (or SD 1.x / 2.x: `python scripts/lora_smoke.py OUT tiny-sd1`) and the built-in Met paintings with their captions. Checks that the loss falls on a fixed batch, the files
are written, and the LoRA file reloads into a fresh copy of the model and changes its output.
Sizes are tiny (the tiny VAE scales by 2, so 64x96 images are 32x48 latents); the code path is the real one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minigen.sd.lora_reading import load_lora
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from minigen.sd.model import random_model



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="runs/lora-smoke")
    p.add_argument("preset", nargs="?", default="tiny", choices=["tiny", "tiny-sd1", "tiny-sd2"],
                   help="tiny (SDXL), tiny-sd1 or tiny-sd2")
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than they gain (30x on a busy 2-core box)
    cfg = LoRATrainConfig(model=f"random:{args.preset}", data="met", max_images=16, resolution="64x96", rank=8, lr=3e-2,
                          targets="kohya", batch=4, epochs=5, caption_prefix="a Met painting, ", out=str(out),
                          validation_prompts=["a Met painting, a harbour at dusk", "a Met painting, a portrait"],
                          validation_steps=4, validation_size="64x64")
    trainer = LoRATrainer(cfg)
    batch = trainer.data.epoch_batches(0)[0]
    before = trainer.fixed_batch_loss(batch)
    trainer.train()
    after = trainer.fixed_batch_loss(batch)
    print(f"loss on a fixed batch: {before:.4f} -> {after:.4f}")
    missing = [n for n in ("lora.safetensors", "checkpoint.safetensors", "loss.png", "log.jsonl",
                           "samples/progress.png") if not (out / n).is_file()]
    fresh = random_model(args.preset)
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    context = torch.randn(1, 77, fresh.unet.config["cross_attention_dim"])
    sdxl = fresh.text_encoder_2 is not None  # SDXL's UNet also takes a pooled prompt and time ids
    pooled, ids = (torch.randn(1, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]])) if sdxl else (None, None)
    with torch.no_grad():
        base = fresh.unet(x, t, context, pooled, ids)
        load_lora(out / "lora.safetensors", {"unet": fresh.unet})
        change = (fresh.unet(x, t, context, pooled, ids) - base).abs().max().item()
    print(f"reloaded LoRA changes the UNet output by up to {change:.4f}")
    ok = after < before and not missing and change > 1e-4
    print("lora-smoke: " + ("OK" if ok else f"FAILED (missing files: {missing})"))
    print(f"look at {out / 'samples' / 'progress.png'} and {out / 'loss.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
