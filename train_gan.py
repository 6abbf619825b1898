"""Train a DCGAN, continue a run, or sample from a checkpoint.

    python train_gan.py --config configs/gan_002_v3.conf --epochs 50          # a preset, one flag overridden
    python train_gan.py --data met --size 320x480 --loss wgan-gp --out runs/met
    python train_gan.py --resume runs/gan/checkpoint.safetensors              # continues with the saved settings
    python train_gan.py --config configs/demo.conf --fid-every 5              # FID vs the training set, logged
    python train_gan.py --sample 1000 --checkpoint runs/gan/checkpoint.safetensors --out runs/gan/fake
    torchrun --nproc_per_node 4 train_gan.py --config configs/demo.conf --device cuda --sync-bn   # data-parallel

A preset (configs/*.conf) is a file of the same flags, one per line, `#` comments allowed; flags given on the command
line after it win. With --resume the run's saved settings come first, then the preset, then the command line.
Under torchrun every rank trains on its --batch rows of each global batch (--batch x ranks images; see
docs/distributed.md); only rank 0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from minigen import cli, distributed, speed
from minigen.training import claim_out, run_settings
from minigen.images import parse_size
from minigen.gan.fid import fid_hook
from minigen.datasets import resolve_dataset
from minigen.gan.config import GANConfig
from minigen.gan.trainer import load_checkpoint, sample_to_folder, train

HELP = {
    "data": "built-in dataset (twemoji, met) or a folder of images",
    "size": "image size HxW or one number (64 = 64x64); see minigen.gan.dcgan.stages_for for the sizes that work",
    "hflip": "mirror training images at random",
    "nz": "latent size", "ngf": "generator width", "ndf": "discriminator width",
    "g_act": "generator activation: relu or leaky",
    "d_norm": "discriminator norm: auto (batch; layer for wgan-gp; none with --spectral-norm), batch, layer, none",
    "spectral_norm": "spectral normalization of the discriminator's convolutions (Miyato et al. 2018)",
    "loss": "bce, wgan-gp or hinge", "real_label": "BCE target range for reals, e.g. 0.7 1 (label smoothing)",
    "fake_label": "BCE target range for fakes, e.g. 0 0.3", "label_flip": "probability of swapping targets",
    "gp_lambda": "WGAN-GP penalty weight", "n_critic": "discriminator steps per generator step",
    "optimizer": "adam or rmsprop", "lr": "learning rate", "lr_d": "discriminator learning rate (default: --lr)",
    "betas": "Adam betas", "alpha": "RMSprop smoothing constant", "eps": "optimizer epsilon",
    "decay_steps": "exponential lr decay: lr * rate ** (step / steps); 0 = off", "decay_rate": "decay rate",
    "ema_halflife": "sample (grids, --sample, FID) from a moving average of G's weights with this half-life in "
                    "generator steps (Karras et al. 2018); 0 = off",
    "diffaugment": "differentiable augmentation of reals and fakes before every discriminator call, a comma list of "
                   "color, translation, cutout (Zhao et al. 2020; helps small datasets); '' = off",
    "batch": "batch size", "epochs": "total epochs (a resumed run stops at the same total)", "seed": "random seed",
    "grid": "images in each epoch's grid", "save_every": "epochs between checkpoints", "out": "output folder",
    "device": "cpu, cuda, cuda:1, ...", "channels_last": "use the channels-last memory layout (faster on GPUs)",
    "sync_bn": "under torchrun: batch norm over the global batch (one exchange per layer and pass); without it each "
               "rank's batch norm normalises its own --batch images",
    "fid_every": "every N epochs, FID of --fid-samples generated images against the training set; 0 = off",
    "fid_samples": "generated images per FID (fixed noise, so epochs compare)",
    "fid_dims": "Inception features for FID: 64, 192, 768 or 2048",
    "fid_weights": "FID Inception weights file (default: make fid-weights' cache, or pytorch-fid's download)",
}


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: only the flags actually given appear, so a preset or a checkpoint's settings fill in the rest.
    p = argparse.ArgumentParser(prog="train_gan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a preset: a file of flags (configs/*.conf)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint")
    p.add_argument("--sample", type=cli.number(int, 1), metavar="N",
                   help="write N PNGs from --checkpoint into --out, then exit")
    p.add_argument("--checkpoint", help="checkpoint to sample from")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    cli.add_threads_arg(p)
    speed.add_speed_args(p, ("tf32", "compile", "fused_optimizer"),
                         "G and D (G only with wgan-gp, whose penalty needs a double backward)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds a run, deleting its checkpoint, log and grids "
                        "(without it such a folder is refused)")
    for field in dataclasses.fields(GANConfig):
        flag, default = "--" + field.name.replace("_", "-"), field.default
        text = f"{HELP[field.name]} (default: {default})"
        if field.name == "size":
            p.add_argument(flag, type=parse_size, help=text)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=2, metavar=("A", "B"), help=text)
        elif field.name == "lr_d":
            p.add_argument(flag, type=float, help=text)
        else:
            p.add_argument(flag, type=type(default), help=text)
    return p


def saved_settings(checkpoint: str) -> dict:
    return run_settings(load_checkpoint(checkpoint)[1], checkpoint, GANConfig)


def parse(argv: list[str]) -> tuple[argparse.Namespace, GANConfig]:
    fields = {f.name for f in dataclasses.fields(GANConfig)}
    args, settings = cli.layered_settings(build_parser(), argv, fields, saved_settings)
    return args, GANConfig(**settings)


# What a run writes: its checkpoint, log, curves and grids, and what `--sample N --out RUN/fake` drew from it.
RUN_FILES = ("checkpoint.safetensors", "log.jsonl", "curves.png", "samples/epoch_*.png", "fake/*.png")


@cli.entry("train_gan.py")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    speed.apply_threads(getattr(args, "threads", None))
    cli.check_device(cfg.device)
    if "sample" in args:
        if "checkpoint" not in args or "out" not in args:
            raise ValueError("--sample N needs --checkpoint FILE and --out DIR")
        paths = sample_to_folder(args.checkpoint, args.sample, args.out, seed=cfg.seed, device=cfg.device)
        print(f"wrote {len(paths)} images to {args.out}")
        return 0
    progress = not getattr(args, "quiet", False)
    with distributed.process_group(cfg.device) as device:
        writer = distributed.is_main()  # rank 0 (or the only process) prints and writes
        if "resume" in args and getattr(args, "overwrite", False):
            raise ValueError("--overwrite starts a fresh run and --resume continues one: give one of them")
        if writer and "resume" not in args:
            resolve_dataset(cfg.data)  # a missing --data fails before --overwrite deletes the previous run
            out = Path(cfg.out)
            claim_out(out, RUN_FILES, getattr(args, "overwrite", False), out / RUN_FILES[0],
                      "checkpoint, log, curves, grids, samples in fake/")
        # Built before training (rank 0 runs the hooks): missing Inception weights stop the run now, not after an epoch.
        hooks = [fid_hook(cfg, progress=progress)] if cfg.fid_every and writer else []
        # channels-last is a setting of the run here (saved, resumed with it), not a switch: the speed line shows it
        asked = dataclasses.replace(speed.speed_from_args(args), channels_last=cfg.channels_last)
        with speed.switched(asked, device, cfg.optimizer) as fast:
            status = train(cfg, resume=getattr(args, "resume", None), epoch_hooks=hooks, progress=progress,
                           device=device, speed=fast)
    if status == "interrupted":
        return 130
    if writer:
        out = Path(cfg.out)
        print(f"grid:       {out / 'samples' / f'epoch_{cfg.epochs:04d}.png'}\ncurves:     {out / 'curves.png'}\n"
              f"checkpoint: {out / 'checkpoint.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
