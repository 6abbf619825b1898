"""Training a DCGAN: one step, the epoch loop with its pictures and log, checkpoints that resume exactly.

Everything random during training (noise, soft labels, flips, hflips, the gradient penalty's mixing, DiffAugment's
transforms) draws from one CPU `torch.Generator`, and each epoch's shuffle from a generator seeded by (seed, epoch).
Its state goes into every checkpoint with the weights and optimizer moments, so a resumed run repeats the
uninterrupted one bit for bit on CPU.
Under `torchrun` every rank trains on its rows of each global batch (minigen/gan/parallel.py says how).

Outputs in `out/`: samples/epoch_0001.png (a grid from one fixed noise batch), log.jsonl (one line per iteration,
one per epoch), curves.png (losses, D outputs, and any per-epoch metrics), checkpoint.safetensors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import torch
from tqdm import tqdm

from .. import distributed
from . import augment, dcgan, parallel
from ..cli import resume_command
from ..atomic import atomic_write, check_can_create, naming
from .data import ImageFolder
from ..datasets import resolve_dataset
from ..io import CheckpointError, load_safetensors, refuse_non_finite, save_safetensors
from ..plot import Panel, plot_panels, save_grid
from ..speed import Speed, optimizer_kernel, prepare_model
from .config import ARCHITECTURE_FIELDS, GANConfig
from ..training import (StopRequest, TrainingDiverged, check_finite_before_saving, epoch_seed,
                        optimizer_from_tensors, optimizer_to_tensors, run_settings)

CHECKPOINT_FORMAT = "minigen-dcgan/1"


class GANTrainer:
    """Models, optimizers and the random state of one run; `step(real)` is one training iteration.

    With `ema_halflife` > 0, `G_ema` holds an exponential moving average of G's weights (Karras et al. 2018,
    "Progressive Growing of GANs"; Yazici et al. 2019, "The Unusual Effectiveness of Averaging in GAN Training"):
    the grids, `--sample` and the FID hook draw from it. It is never trained; it smooths the oscillation of G's
    weights around the game's equilibrium, which a fast generator learning rate makes large.
    """

    def __init__(self, cfg: GANConfig, device: str | None = None, speed: Speed = Speed()):
        """device: this rank's (distributed.process_group's), default cfg.device. speed: --compile (minigen/speed.py)."""
        self.cfg = cfg
        self.device = torch.device(device or cfg.device)
        self.speed = speed.resolved(self.device)
        self.ranks = distributed.world_size()
        torch.manual_seed(cfg.seed)  # the weight init, on the CPU: the same on every rank
        self.G = dcgan.Generator(cfg.size, cfg.nz, cfg.ngf, cfg.g_act).to(self.device)
        self.D = dcgan.Discriminator(cfg.size, cfg.ndf, cfg.d_norm, cfg.spectral_norm).to(self.device)
        if cfg.sync_bn:
            parallel.sync_batch_norm(self.G)
            parallel.sync_batch_norm(self.D)
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if cfg.ema_halflife else None
        prepare_model(self.G, self.speed)  # --compile (channels-last is cfg.channels_last, above)
        if cfg.loss != "wgan-gp":  # the gradient penalty differentiates D twice: torch.compile has no double backward
            prepare_model(self.D, self.speed)
        self.opt_g = self.make_optimizer(self.G, cfg.lr)
        self.opt_d = self.make_optimizer(self.D, cfg.lr_d or cfg.lr)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.fixed_noise = torch.randn(cfg.grid, cfg.nz, generator=self.rng)  # (grid, nz), the same all run
        self.iteration = 0  # discriminator updates so far
        self.epoch, self.batch_index = 0, 0  # where the next iteration starts
        self.last_g_loss = float("nan")

    def make_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg, fast = self.cfg, dict(foreach=True)  # foreach: one fused kernel per step for all tensors
        if cfg.optimizer == "adam":  # on CUDA Adam's fused kernel, unless --no-fused-optimizer (speed.py)
            fast = optimizer_kernel(model.parameters(), self.speed) or fast
            return torch.optim.Adam(model.parameters(), lr=lr, betas=cfg.betas, eps=cfg.eps, **fast)
        return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=cfg.alpha, eps=cfg.eps, **fast)

    def set_learning_rates(self) -> None:
        """Exponential decay by the step count, as Keras' ExponentialDecay (seed 000: every 1000 steps by 0.95)."""
        cfg = self.cfg
        factor = cfg.decay_rate ** (self.iteration / cfg.decay_steps) if cfg.decay_steps else 1.0
        for opt, lr in ((self.opt_g, cfg.lr), (self.opt_d, cfg.lr_d or cfg.lr)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    def mine(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's rows of random `values` drawn for the whole global batch (all of them with one process)."""
        return values[parallel.my_rows(len(values))]

    def step(self, real: torch.Tensor) -> dict[str, float]:
        """One discriminator update, and a generator update every n_critic-th call. real: (B, 3, H, W) in [-1, 1],
        this rank's rows of a global batch of B x ranks: its random numbers are drawn for all of them."""
        cfg, b = self.cfg, real.shape[0]
        n = b * self.ranks
        if cfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        self.set_learning_rates()
        z = self.mine(torch.randn(n, cfg.nz, generator=self.rng)).to(self.device)  # (B, nz)
        fake = self.G(z)  # (B, 3, H, W)

        # Patch: with --diffaugment, D sees augmented images (Zhao et al. 2020); draws for the global batch, our rows.
        draws = augment.Randomness(self.rng, n, self.mine)
        real_score, fake_score = (self.D(augment.diff_augment(x, cfg.diffaugment, draws))
                                  for x in (real, fake.detach()))  # (B,) logits
        if cfg.loss == "bce":
            real_target = self.mine(dcgan.soft_labels(n, *cfg.real_label, generator=self.rng))  # (B,)
            fake_target = self.mine(dcgan.soft_labels(n, *cfg.fake_label, generator=self.rng))
            if cfg.label_flip > 0:
                flip = self.mine(torch.rand(n, generator=self.rng)) < cfg.label_flip
                real_target, fake_target = (torch.where(flip, fake_target, real_target),
                                            torch.where(flip, real_target, fake_target))
            loss_d = dcgan.bce_d_loss(real_score, fake_score, real_target.to(self.device), fake_target.to(self.device))
        elif cfg.loss == "wgan-gp":
            mix = self.mine(torch.rand(n, 1, 1, 1, generator=self.rng))  # (B, 1, 1, 1)
            loss_d = (dcgan.wgan_d_loss(real_score, fake_score)
                      + cfg.gp_lambda * dcgan.gradient_penalty(self.D, real, fake, mix=mix))
        else:
            loss_d = dcgan.hinge_d_loss(real_score, fake_score)
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d / self.ranks).backward()  # each rank's share of the global batch's mean; summed next
        distributed.sum_gradients(list(self.D.parameters()), "the other ranks' D gradients")
        self.opt_d.step()

        if (self.iteration + 1) % cfg.n_critic == 0:
            # The same fakes, scored by the updated D, as in the DCGAN tutorial. D's weights need no gradient here.
            self.D.requires_grad_(False)
            score = self.D(augment.diff_augment(fake, cfg.diffaugment, draws))
            loss_g = dcgan.bce_g_loss(score) if cfg.loss == "bce" else dcgan.wgan_g_loss(score)
            self.opt_g.zero_grad(set_to_none=True)
            (loss_g / self.ranks).backward()
            distributed.sum_gradients(list(self.G.parameters()), "the other ranks' G gradients")
            self.opt_g.step()
            self.D.requires_grad_(True)
            if self.G_ema is not None:
                self.update_ema()
            self.last_g_loss = loss_g.item()
        self.iteration += 1
        # D(x) and D(G(z)): probabilities for BCE; raw critic scores for WGAN-GP and hinge.
        shown = torch.sigmoid if cfg.loss == "bce" else (lambda s: s)
        return {"loss_d": loss_d.item(), "loss_g": self.last_g_loss,
                "d_real": shown(real_score.detach()).mean().item(), "d_fake": shown(fake_score.detach()).mean().item(),
                "lr_g": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}

    @torch.no_grad()
    def update_ema(self) -> None:
        """G_ema <- beta G_ema + (1 - beta) G after each generator step, beta = 0.5 ** (1 / half-life): a step's weights
        count half as much `ema_halflife` steps later. G's buffers (BatchNorm's running statistics, unused: sampling
        uses batch statistics) are copied, not averaged.
        """
        beta = 0.5 ** (1 / self.cfg.ema_halflife)
        for average, weight in zip(self.G_ema.parameters(), self.G.parameters()):
            average.lerp_(weight, 1 - beta)
        for average, buffer in zip(self.G_ema.buffers(), self.G.buffers()):
            average.copy_(buffer)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for noise (B, nz), from G_ema when there is one, else from G.

        # Deviation from the eval-mode convention, as the PyTorch DCGAN tutorial does: sample with batch statistics;
        a GAN generator's running averages lag behind its weights and give washed-out pictures.
        """
        G = self.G if self.G_ema is None else self.G_ema
        return G(z.to(self.device)).float().cpu()

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically (rank 0; every rank calls it); a NaN or infinity anywhere in it (a BatchNorm
        running variance, an Adam moment) raises TrainingDiverged instead, on every rank, leaving the file as it was."""
        tensors = {f"G.{k}": v for k, v in self.G.state_dict().items()}
        tensors |= {f"D.{k}": v for k, v in self.D.state_dict().items()}
        if self.G_ema is not None:
            tensors |= {f"G_ema.{k}": v for k, v in self.G_ema.state_dict().items()}
        metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(dataclasses.asdict(self.cfg)),
                    "iteration": str(self.iteration), "epoch": str(self.epoch), "batch_index": str(self.batch_index),
                    "last_g_loss": repr(self.last_g_loss), "global_batch": str(self.cfg.batch * self.ranks),
                    "ranks": str(self.ranks)}
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            opt_tensors, metadata[name] = optimizer_to_tensors(opt, name)
            tensors |= opt_tensors
        tensors["rng"] = self.rng.get_state()  # uint8
        tensors["fixed_noise"] = self.fixed_noise
        check_finite_before_saving(tensors, path, f"by iteration {self.iteration}")
        if not distributed.is_main():
            return
        with naming(path):
            save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata)

    def load(self, path: str | Path) -> None:
        tensors, metadata = load_checkpoint(path)
        refuse_non_finite(tensors, path)
        saved = run_settings(metadata, str(path), GANConfig)
        for name in ARCHITECTURE_FIELDS:
            ours = getattr(self.cfg, name)
            theirs = tuple(saved[name]) if isinstance(ours, tuple) else saved[name]
            if ours != theirs:
                raise CheckpointError(f"{path} was trained with {name}={theirs}, this run has {name}={ours}")
        try:
            self.G.load_state_dict(section(tensors, "G."))
            self.D.load_state_dict(section(tensors, "D."))
            if self.G_ema is not None:
                # A run that had no average (or resumes with --ema-halflife newly set) starts it from G's weights.
                self.G_ema.load_state_dict(section(tensors, "G_ema.") or self.G.state_dict())
            optimizer_from_tensors(self.opt_g, section(tensors, "opt_g."), metadata["opt_g"])
            optimizer_from_tensors(self.opt_d, section(tensors, "opt_d."), metadata["opt_d"])
            self.rng.set_state(tensors["rng"])
            self.fixed_noise = tensors["fixed_noise"]
            self.iteration, self.epoch = int(metadata["iteration"]), int(metadata["epoch"])
            self.last_g_loss = float(metadata["last_g_loss"])
            self.batch_index = parallel.resume_position(  # from another --batch x ranks: a warning
                int(metadata["batch_index"]), int(metadata.get("global_batch", saved["batch"])),
                self.cfg.batch * self.ranks)
        except (KeyError, ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's missing keys, shapes
            raise CheckpointError(f"{path}: an incomplete or inconsistent DCGAN checkpoint ({type(e).__name__}: "
                                  f"{e})") from None


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a DCGAN checkpoint; a truncated file or another kind of file is a CheckpointError."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a minigen DCGAN checkpoint (format {metadata.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r})")
    return tensors, metadata


def load_generator(path: str | Path, device: str = "cpu") -> tuple[dcgan.Generator, GANConfig]:
    """The generator of a checkpoint, ready to sample (the average of its weights, G_ema, when the run kept one), and
    the config it was trained with. NaN or infinite weights (a run saved after it diverged) are refused: they would
    give black images."""
    tensors, metadata = load_checkpoint(path)
    cfg = GANConfig(**run_settings(metadata, str(path), GANConfig))
    prefix = "G_ema." if any(k.startswith("G_ema.") for k in tensors) else "G."
    weights = section(tensors, prefix)
    refuse_non_finite({prefix + k: v for k, v in weights.items()}, path)
    G = dcgan.Generator(cfg.size, cfg.nz, cfg.ngf, cfg.g_act)
    try:
        G.load_state_dict(weights)
    except RuntimeError as e:  # missing keys or other shapes than its own settings say
        raise CheckpointError(f"{path}: its generator does not match its settings ({e})") from None
    return G.to(device), cfg


# -- the epoch loop -------------------------------------------------------------------------------------------------

# A per-epoch metric (FID during training, say): called with the trainer after each epoch's grid; its {name: value}
# is written to log.jsonl and drawn in the third panel of curves.png.
EpochHook = Callable[[GANTrainer], dict[str, float]]


def read_log(path: Path, up_to_iteration: int) -> list[dict]:
    """The log records of the iterations a resumed run keeps (later ones, from after the checkpoint, are dropped)."""
    if not path.exists():
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["iteration"] <= up_to_iteration]


def draw_curves(records: list[dict], path: Path, title: str) -> None:
    steps = [r["iteration"] for r in records if "loss_d" in r]
    column = {k: [r[k] for r in records if "loss_d" in r] for k in ("loss_d", "loss_g", "d_real", "d_fake")}
    panels = [Panel({"D loss": (steps, column["loss_d"]), "G loss": (steps, column["loss_g"])}, "losses", smooth=0.9),
              Panel({"D(x)": (steps, column["d_real"]), "D(G(z))": (steps, column["d_fake"])}, "discriminator output",
                    smooth=0.9)]
    epoch_records = [r for r in records if "metrics" in r]
    names = sorted({n for r in epoch_records for n in r["metrics"]})
    if names:
        panels.append(Panel({n: ([r["epoch"] for r in epoch_records if n in r["metrics"]],
                                 [r["metrics"][n] for r in epoch_records if n in r["metrics"]]) for n in names},
                            "per-epoch metrics", xlabel="epoch"))
    plot_panels(panels, path, title=title)


def train(cfg: GANConfig, resume: str | Path | None = None, epoch_hooks: Iterable[EpochHook] = (),
          progress: bool = True, device: str | None = None, speed: Speed = Speed()) -> str:
    """Run (or continue) training; return 'done' or 'interrupted'. A NaN loss raises TrainingDiverged. Under torchrun
    every rank calls it (device: its own); rank 0 alone writes, prints and runs the epoch hooks. speed: --compile
    (minigen/speed.py)."""
    main = distributed.is_main()
    progress = progress and main
    out = Path(cfg.out)
    check_can_create(out, folder=True, what="--out")
    dataset = ImageFolder(resolve_dataset(cfg.data), cfg.size, cfg.hflip, progress=progress)
    ranks = distributed.world_size()
    global_batch = cfg.batch * ranks
    n_batches = len(dataset) // global_batch
    if n_batches == 0:
        raise ValueError(f"--batch {cfg.batch} x {ranks} rank(s) is larger than the dataset ({len(dataset)} images in "
                         f"{cfg.data})")
    trainer = GANTrainer(cfg, device, speed)
    checkpoint, log_path = out / "checkpoint.safetensors", out / "log.jsonl"
    if resume:
        trainer.load(resume)
        if trainer.epoch >= cfg.epochs:  # nothing left to train: say so rather than exit 0 having done nothing
            raise ValueError(f"--epochs {cfg.epochs}: the run in {resume} has trained {trainer.epoch} epochs; --epochs "
                             f"is the total, so give more (--epochs {trainer.epoch + 30} trains 30 more)")
    records = read_log(log_path, trainer.iteration) if resume else []
    if main:
        with atomic_write(log_path, "w") as f:  # the log as of the checkpoint (nothing, for a new run)
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"training on {len(dataset)} images, {n_batches} iterations per epoch of {global_batch} ({cfg.batch} x "
              f"{ranks} rank(s)), epochs {trainer.epoch + 1}..{cfg.epochs}; outputs in {out}", file=sys.stderr)

    with open(log_path if main else os.devnull, "a") as log, StopRequest() as stop:
        for epoch in range(trainer.epoch, cfg.epochs):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
            bar = tqdm(range(trainer.batch_index, n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False, unit="it")
            start = time.perf_counter()
            for b in bar:
                indices = order[b * global_batch:(b + 1) * global_batch]
                real = dataset.batch(indices, generator=trainer.rng, rows=parallel.my_rows(global_batch))
                stats, stopping = parallel.agree(trainer.step(real.to(trainer.device)), stop.requested)
                g_updated = trainer.iteration >= cfg.n_critic  # before that, loss_g is NaN by design
                if not math.isfinite(stats["loss_d"]) or (g_updated and not math.isfinite(stats["loss_g"])):
                    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint yet"
                    raise TrainingDiverged(f"loss became {stats['loss_d']} (D) / {stats['loss_g']} (G) at iteration "
                                           f"{trainer.iteration}, epoch {epoch + 1}; stopped; {kept}. Try a lower "
                                           f"--lr, label smoothing, or --loss wgan-gp")
                record = {"iteration": trainer.iteration, "epoch": epoch + 1, **stats}
                records.append(record)
                log.write(json.dumps(record) + "\n")
                trainer.epoch, trainer.batch_index = epoch, b + 1
                bar.set_postfix(d=f"{stats['loss_d']:.3f}", g=f"{stats['loss_g']:.3f}", refresh=False)
                if stopping:
                    log.flush()
                    trainer.save(checkpoint)
                    if main:
                        print(f"interrupted at iteration {trainer.iteration}; saved {checkpoint}; continue with "
                              f"{resume_command('train_gan.py', checkpoint)}", file=sys.stderr)
                    return "interrupted"
            trainer.epoch, trainer.batch_index = epoch + 1, 0
            if main:
                end_epoch(trainer, records, log, epoch_hooks, seconds=time.perf_counter() - start)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                trainer.save(checkpoint)
    return "done"


def end_epoch(trainer: GANTrainer, records: list[dict], log: TextIO, epoch_hooks: Iterable[EpochHook],
              seconds: float) -> None:
    """Rank 0's work after an epoch: the grid, the hooks' metrics (logged), the curves and a line on stderr."""
    cfg, epoch, out = trainer.cfg, trainer.epoch, Path(trainer.cfg.out)
    grid = out / "samples" / f"epoch_{epoch:04d}.png"
    save_grid(trainer.generate(trainer.fixed_noise), grid, nrow=int(math.sqrt(cfg.grid) + 0.5))
    metrics = {}
    for hook in epoch_hooks:
        metrics |= hook(trainer)
    if metrics:
        record = {"iteration": trainer.iteration, "epoch": epoch, "metrics": metrics}
        records.append(record)
        log.write(json.dumps(record) + "\n")
    log.flush()
    draw_curves(records, out / "curves.png", f"DCGAN {cfg.size[0]}x{cfg.size[1]} on {Path(cfg.data).name}, {cfg.loss}")
    last = next(r for r in reversed(records) if "loss_d" in r)
    print(f"epoch {epoch}/{cfg.epochs}: {seconds:.1f} s, D loss {last['loss_d']:.3f}, G loss {last['loss_g']:.3f}, "
          f"grid {grid}", file=sys.stderr)


def sample_to_folder(checkpoint: str | Path, n: int, out: str | Path, batch: int = 64, seed: int = 0,
                     device: str = "cpu") -> list[Path]:
    """Write n generated images as PNGs 000000.png, 000001.png, ... into `out` (for FID and friends)."""
    out = Path(out)
    check_can_create(out, folder=True, what="--out")
    G, cfg = load_generator(checkpoint, device)
    paths = []
    for z in tqdm(noise_batches(n, cfg.nz, batch, seed), total=math.ceil(n / batch), desc="sampling", unit="batch"):
        with torch.no_grad():
            images = G(z.to(device)).cpu()  # batch statistics, as in GANTrainer.generate
        for image in images:
            path = out / f"{len(paths):06d}.png"
            save_grid(image[None], path, nrow=1, padding=0)
            paths.append(path)
    return paths


def noise_batches(n: int, nz: int, batch: int = 64, seed: int = 0) -> Iterator[torch.Tensor]:
    """n latent vectors in batches (B, nz) drawn from a generator seeded with `seed`: the same ones on every call,
    so `--sample` and the FID hook (minigen.gan.fid) see the same images from the same weights."""
    rng = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        yield torch.randn(min(batch, n - start), nz, generator=rng)  # (B, nz)
