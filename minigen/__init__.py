"""minigen: a small, readable, pure-PyTorch image-generation library (DCGAN, SD + LoRA, samplers, merging, FID).

The systems, each a package, and what each may import (one way, down this list; `tests/test_layout.py` checks it):

    the top-level modules   what every system uses: io, atomic, cache, images, plot, cli, distributed, speed,
                            training (stop requests, seeds, optimizer state), datasets, emoji_names, captions, colours
    diffusion/  fid/  lora/ noise schedules and samplers; FID/KID/IS; LoRA adapters and file formats   (the top)
    gan/                    the DCGAN                                                  (the top, fid)
    sd/                     Stable Diffusion's models, files and pipeline              (the top, diffusion, lora)
    finetune/  merge/       training SD's parts; merging checkpoints and LoRAs         (the above but gan)
    evaluate/               eval.py: models and LoRAs scored side by side              (the top, fid, sd, finetune)

The command-line tools at the repository's top (`train_gan.py`, `sample.py`, ...) import the library; the library
never imports them.
"""

__version__ = "0.1.0"
