"""LoRA fine-tuning of Stable Diffusion (SD 1.x, 2.x, SDXL): freeze the model, train low-rank adapters on a
captioned image folder (`train_lora.py`).

One training step (diffusers' train_text_to_image_lora_sdxl.py and kohya's sdxl_train_network.py do the same):

    latents  = VAE(image) * scaling_factor                    # cached once when possible, (B, 4, H/8, W/8)
    noise    = N(0, 1) + noise_offset * N(0, 1) per channel   # the offset lets the model shift overall brightness
    t        ~ U{0, ..., 999};  x_t = sqrt(a_t) latents + sqrt(1 - a_t) noise
    loss     = w(t) * || UNet(x_t, t, text, pooled, time ids) - target ||^2     target: noise (epsilon) or v
               (pooled and time ids: SDXL only; the target the model's scheduler config names, v for SD 2 768-v)
               w(t) = min-SNR-gamma weight (Hang et al. 2023), times prior_loss_weight for DreamBooth class images

Everything random about one sample (noise, timestep, caption dropout, random crop) draws from a generator seeded by
(seed, epoch, batch, position in the global batch), and the batch order from one per epoch: a resumed run continues
exactly where an uninterrupted one would be, and under torchrun (see minigen/distributed.py) N ranks of batch b draw
what one process of batch N x b draws; the ranks' gradients are summed after each backward pass (LoRA weights only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed
from ..cli import resume_command
from ..atomic import atomic_write, check_can_create, naming
from ..captions import drop_captions
from ..diffusion.schedule import NoiseSchedule
from ..images import parse_size
from ..io import CheckpointError, load_safetensors, refuse_non_finite, save_safetensors
from ..lora.layers import lora_weights
from .config import MIXED_PRECISION, LoRATrainConfig, add_adapters, lr_factor, network_args
from .data import TrainingSet, check_sizes, load_examples
from ..plot import plot_curves, save_grid, save_png, with_row_labels
from ..sd.convert import unet_name_map
from ..sd.lora_files import kohya_metadata, save_lora
from ..sd.model import StableDiffusion, load_model
from ..sd.pipeline import Pipeline
from ..speed import Speed, optimizer_kernel, prepare_model
from ..training import (StopRequest, TrainingDiverged, check_finite_before_saving, optimizer_from_tensors,
                        optimizer_to_tensors)

CHECKPOINT_FORMAT = "minigen-lora-train-1"


class LoRATrainer:
    KIND, CLI = "lora", "train_lora.py"  # what it trains (progress bar, log), the command that continues a run

    def __init__(self, cfg: LoRATrainConfig, model: StableDiffusion | None = None, progress: bool = True,
                 allow_pickle: bool = False, device: str | None = None, speed: Speed = Speed()):
        """model: the loaded model, instead of loading cfg.model. allow_pickle: accept a pickled --model checkpoint
        (loaded with weights_only=True). device: this rank's (distributed.process_group's), default cfg.device.
        speed: --compile, --channels-last, --fused-optimizer."""
        self.cfg, self.progress = cfg, progress and distributed.is_main()
        self.device = torch.device(device or cfg.device)
        self.ranks = distributed.world_size()
        self.dtype = MIXED_PRECISION[cfg.mixed_precision]
        self.out = Path(cfg.out)
        check_can_create(self.out, folder=True, what="--out")
        items = load_examples(cfg)[: cfg.max_images or None]  # bad data stops the run before the model loads
        if not (model or cfg.model):
            raise ValueError("--model is required: a diffusers folder, a single file (v1-5-pruned-emaonly.safetensors, "
                             "sd_xl_base_1.0.safetensors, ...), or random:tiny-sd1 / random:tiny-sd2 / random:tiny")
        self.model = model or load_model(cfg.model, dtype=self.dtype, device=self.device, allow_pickle=allow_pickle)
        if self.model.family == "sdxl-refiner":  # its UNet takes an aesthetic score no caption data carries
            raise ValueError(f"{cfg.model or 'the model'} is the SDXL refiner: LoRA training takes SD 1.x, SD 2.x and "
                             "SDXL base-layout models (the refiner is conditioned on aesthetic scores the training "
                             "data does not have)")
        check_sizes(cfg, self.model)
        prediction = {"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}  # else the model's
        self.schedule = NoiseSchedule.from_config({**self.model.scheduler_config, **prediction})
        torch.manual_seed(cfg.seed)  # LoRA init
        self.models = self.prepare_trainable()
        distributed.broadcast_from_main(list(self.trainable().values()), "rank 0's initial LoRA weights")
        torch.manual_seed(distributed.derived_seed(cfg.seed, "dropout", distributed.rank()))  # LoRA dropout, per rank
        if cfg.gradient_checkpointing:
            for model in self.models.values():
                model.set_gradient_checkpointing(True)
        prepare_model(self.model.unet, speed)  # after add_lora: compiled with its adapters
        self.speed = speed
        params = [p for c, m in self.models.items() if c not in ("te1", "te2") for p in m.parameters()
                  if p.requires_grad]  # the UNet's (the VAE's in train_sd.py's VAE stage)
        te_params = [p for c in ("te1", "te2") if c in self.models for p in self.models[c].parameters()
                     if p.requires_grad]
        groups = [{"params": params, "lr": cfg.lr}]
        if te_params:
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.lr})
        self.optimizer = self.make_optimizer(groups)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.data = self.training_set(items)
        self.steps_per_epoch = math.ceil(len(self.data.epoch_batches(0, self.ranks)) / cfg.grad_accum)
        total = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg.lr_scheduler, s, cfg.warmup_steps, total))

    def prepare_trainable(self) -> dict[str, torch.nn.Module]:
        """Add the LoRA adapters (their weights are what trains) and return the parts they are in, by component
        name ("unet", "te1", "te2"). minigen/finetune/from_scratch.py trains all weights of other parts instead."""
        models = {c: m for c, m in self.model.lora_components().items() if c == "unet" or self.cfg.train_text_encoder}
        add_adapters(models, self.cfg)
        return models

    def training_set(self, items) -> TrainingSet:
        return TrainingSet(self.cfg, self.model, items, self.progress)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                     **optimizer_kernel((p for g in groups for p in g["params"]), self.speed))
        if cfg.optimizer == "adafactor":  # seed 000: memory-light second moments, fixed lr
            return torch.optim.Adafactor(groups, lr=cfg.lr)
        return torch.optim.SGD(groups, lr=cfg.lr)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"{c}.{n}": p for c, m in self.models.items() for n, p in m.named_parameters() if p.requires_grad}

    # -- one micro-batch -----------------------------------------------------------------------------------------

    def loss(self, batch: list[int], generators: list[torch.Generator], global_size: int) -> torch.Tensor:
        """The weighted loss of `batch` (this rank's samples), summed and divided by `global_size`, the number of
        samples in the global batch: summed over the ranks it is the global batch's mean loss."""
        cfg, unet = self.cfg, self.model.unet
        examples = [self.data.examples[i] for i in batch]
        latents, ids = self.data.latents(examples, generators)  # (B, 4, h, w), (B, 6) or None (SD 1/2)
        captions = [drop_captions([e.item.caption], cfg.caption_dropout, g)[0] for e, g in zip(examples, generators)]
        shape = latents.shape[1:]  # (4, h, w)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators])
        t = torch.cat([torch.randint(0, self.schedule.num_train_timesteps, (1,), generator=g) for g in generators])
        noise, t = noise.to(self.device), t.to(self.device)
        noisy = self.schedule.add_noise(latents, noise, t)
        target = self.schedule.target(latents, noise, t)
        with torch.autocast(self.device.type, self.dtype, enabled=cfg.mixed_precision != "no"):
            context, pooled = self.data.text(captions)  # (B, 77, D), (B, P) or None (SD 1/2)
            w = unet.conv_in.weight.dtype
            if pooled is not None:  # SDXL's added conditioning
                pooled, ids = pooled.to(w), ids.to(self.device, w)
            pred = unet(noisy.to(w), t, context.to(w), pooled, ids)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        weight = torch.tensor([cfg.prior_loss_weight if e.item.is_class_image else 1.0 for e in examples],
                              device=self.device)
        if cfg.min_snr_gamma:
            weight = weight * self.schedule.min_snr_weight(t, cfg.min_snr_gamma).to(self.device)
        return (per_sample * weight).sum() / global_size

    def fixed_batch_loss(self, batch: list[int], seed: int = 0) -> float:
        """The loss on `batch` with noise and timesteps from `seed`: comparable before and after training."""
        generators = [torch.Generator().manual_seed(distributed.derived_seed(seed, k)) for k in range(len(batch))]
        with torch.no_grad():
            return self.loss(batch, generators, len(batch)).item()

    # -- the loop ------------------------------------------------------------------------------------------------

    def optimizer_step(self) -> None:
        params = list(self.trainable().values())
        distributed.sum_gradients(params)  # each rank's loss was its share of the global mean: the sum is the gradient
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train(self, stop_after_steps: int | None = None) -> str:
        """Run to cfg.epochs (or stop after `stop_after_steps` more optimizer steps, saving a checkpoint: used to
        test resuming). Returns "done", "stopped", or "interrupted" when Ctrl-C or SIGTERM reached any rank: every
        rank stops at the same optimizer step and rank 0 saves a checkpoint there."""
        with StopRequest() as stop:
            return self._train(stop_after_steps, stop)

    def _train(self, stop_after_steps: int | None, stop: StopRequest) -> str:
        cfg = self.cfg
        main = distributed.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / "log.jsonl"
        self.records = self.read_log(log) if main else []
        global_batch = cfg.batch * self.ranks * cfg.grad_accum
        if main:
            print(f"{self.KIND}: global batch {global_batch} = batch {cfg.batch} x {self.ranks} rank(s) x accumulation "
                  f"{cfg.grad_accum}; {self.steps_per_epoch} steps per epoch")
        if self.epoch == 0 and self.batch_in_epoch == 0:
            self.validate()
        start = self.step
        bar = tqdm(total=self.steps_per_epoch * cfg.epochs, initial=self.step, desc=self.KIND, unit="step",
                   disable=not self.progress)
        for model in self.models.values():
            model.train()
        stop_all = False
        while self.epoch < cfg.epochs:
            batches = self.data.epoch_batches(self.epoch, self.ranks)
            window: list[float] = []
            while self.batch_in_epoch < len(batches):
                whole = batches[self.batch_in_epoch]
                first, mine = distributed.my_part(whole, cfg.batch)  # a rank may get fewer samples, or none
                generators = self.data.sample_generators(self.epoch, self.batch_in_epoch, first, len(mine))
                loss = self.loss(mine, generators, len(whole)) if mine else torch.zeros((), device=self.device)
                # one exchange: the loss (a NaN anywhere stops all) and whether any rank was asked to stop
                (total,), stopping = distributed.sum_and_stop(loss.float(), stop.requested,
                                                              "the other ranks' losses and stop requests")
                stop_all = stop_all or stopping
                if not torch.isfinite(total):
                    raise TrainingDiverged(f"the loss became {total.item()} at step {self.step} (epoch "
                                           f"{self.epoch + 1}); the last checkpoint in {self.out} is left as it was")
                if mine:
                    self.scaler.scale(loss / cfg.grad_accum).backward()
                window.append(total.item())
                self.batch_in_epoch += 1
                if len(window) == cfg.grad_accum or self.batch_in_epoch == len(batches):
                    lr = self.scheduler.get_last_lr()[0]
                    self.optimizer_step()
                    record = {"step": self.step, "epoch": self.epoch + 1, "loss": sum(window) / len(window),
                              "lr": lr, "global_batch": global_batch, "ranks": self.ranks, "time": time.time()}
                    self.write_log(log, record)
                    window = []
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=self.epoch + 1)
                    if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                        self.save_checkpoint()
                    if stop_after_steps is not None and self.step - start >= stop_after_steps:
                        self.save_checkpoint()
                        bar.close()
                        return "stopped"
                    if stop_all:  # at an optimizer step: nothing half-accumulated is lost
                        bar.close()
                        return self.interrupted()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs:
                self.save_checkpoint()  # first: it checks everything (LoRA weights too) for NaN before any write
                self.save_result(final=False)
            self.validate()
            if main:
                plot_curves({"loss": ([r["step"] for r in self.records], [r["loss"] for r in self.records])},
                            self.out / "loss.png", title=f"{self.KIND} training loss", smooth=0.9)
        bar.close()
        self.save_result(final=True)
        return "done"

    def save_result(self, final: bool) -> None:
        """What the run makes: lora-epoch-NNNN.safetensors after an epoch, lora.safetensors at the end."""
        self.save_lora(self.out / ("lora.safetensors" if final else f"lora-epoch-{self.epoch:04d}.safetensors"))

    def interrupted(self) -> str:
        """Save where the run stands (rank 0) and say how to continue."""
        checkpoint = self.save_checkpoint()
        if distributed.is_main():
            print(f"interrupted at step {self.step}; saved {checkpoint}; continue with "
                  f"{resume_command(self.CLI, checkpoint)}")
        return "interrupted"

    def read_log(self, path: Path) -> list[dict]:
        """The log's records up to this run's step (a resumed run drops those written after its checkpoint)."""
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["step"] <= self.step]
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        return kept

    def write_log(self, path: Path, record: dict) -> None:
        if not distributed.is_main():
            return
        self.records.append(record)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- outputs -------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """The validation prompts from the same starting noise every epoch: samples/epoch_NNNN.png (one image per
        prompt) and samples/progress.png (one row per epoch so far, epoch 0 = the model before training). Each rank
        draws its share of the prompts; rank 0 writes."""
        cfg = self.cfg
        if not cfg.validation_prompts:
            return
        h, w = parse_size(cfg.validation_size or cfg.resolution)
        for model in self.models.values():
            model.eval()
        pipe = Pipeline(self.model)
        _, mine = distributed.share(cfg.validation_prompts)
        drawn = [pipe(p, steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale, height=h, width=w,
                      clip_skip=cfg.clip_skip, generator=torch.Generator().manual_seed(cfg.validation_seed),
                      output="float")[0].cpu()
                 for p in mine]  # each (3, H, W) in [0, 1]
        images = [image for part in distributed.gather_objects(drawn, "the other ranks' validation images")
                  for image in part]
        for model in self.models.values():
            model.train()
        if not distributed.is_main():
            return
        folder = self.out / "samples"
        save_grid(torch.stack(images) * 2 - 1, folder / f"epoch_{self.epoch:04d}.png", nrow=len(images))
        self.draw_progress(folder)

    @staticmethod
    def draw_progress(folder: Path) -> None:
        from PIL import Image

        paths = sorted(folder.glob("epoch_*.png"))
        rows = [Image.open(p).convert("RGB") for p in paths]
        sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
        for k, row in enumerate(rows):
            sheet.paste(row, (0, sum(r.height for r in rows[:k])))
        labels = [f"epoch {int(p.stem.removeprefix('epoch_'))}" for p in paths]  # epoch 0: before training
        save_png(with_row_labels(sheet, labels), folder / "progress.png")

    def lora_file_contents(self) -> dict:
        return {c: lora_weights(self.models[c]) for c in self.models}

    def save_lora(self, path: Path) -> None:
        """Write the LoRA file (atomically, rank 0 only); NaN or infinite weights raise TrainingDiverged on every rank
        and write nothing."""
        check_finite_before_saving(self.trainable(), path, f"at step {self.step}")
        if not distributed.is_main():
            return
        cfg = self.cfg
        h, w = parse_size(cfg.resolution)
        metadata = kohya_metadata(base_model=Path(cfg.model).name, rank=cfg.rank, alpha=cfg.alpha or cfg.rank,
                                  resolution=(w, h), trigger_phrase=cfg.caption_prefix.strip(" ,") or
                                  cfg.instance_prompt, steps=self.step, epoch=self.epoch, title=self.out.name,
                                  model=self.model.family, prediction=self.schedule.prediction_type,
                                  clip_skip=cfg.clip_skip,
                                  extra={"ss_learning_rate": cfg.lr, "ss_optimizer": cfg.optimizer,
                                         **network_args(cfg)})
        with naming(path):
            save_lora(path, self.lora_file_contents(), cfg.format, metadata,
                      unet_names=unet_name_map(dict(self.model.unet.config)), family=self.model.family)

    def save_checkpoint(self) -> Path:
        """out/checkpoint.safetensors: LoRA weights, optimizer, scheduler, grad scaler and RNG states (atomic).
        A NaN or infinity in any of them raises TrainingDiverged and leaves the previous checkpoint as it was."""
        tensors = {f"lora.{k}": p.detach() for k, p in self.trainable().items()}
        opt_tensors, opt_settings = optimizer_to_tensors(self.optimizer, "optimizer")
        tensors |= opt_tensors | distributed.rank_rng_states(self.device)  # LoRA dropout's masks, per rank
        metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(self.settings_to_save()),
                    "step": str(self.step), "epoch": str(self.epoch), "batch_in_epoch": str(self.batch_in_epoch),
                    "micro_batch": str(self.cfg.batch * self.ranks), "ranks": str(self.ranks),
                    "batches_in_epoch": str(len(self.data.epoch_batches(self.epoch, self.ranks))),
                    "optimizer": opt_settings, "scheduler": json.dumps(self.scheduler.state_dict()),
                    "scaler": json.dumps(self.scaler.state_dict())}
        path = self.out / "checkpoint.safetensors"
        check_finite_before_saving(tensors, path, f"at step {self.step}")
        if not distributed.is_main():
            return path
        with naming(path):
            save_safetensors({k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata)
        return path

    def settings_to_save(self) -> dict:
        """The settings a checkpoint keeps, for a resumed run to start from."""
        return dataclasses.asdict(self.cfg)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        tensors, metadata = load_checkpoint(path)
        refuse_non_finite(tensors, path)
        ours = self.trainable()
        theirs = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        if ours.keys() != theirs.keys():
            raise CheckpointError(f"{path} holds {len(theirs)} LoRA tensors, this run has {len(ours)} "
                                  "(different targets, text-encoder training or model?)")
        with torch.no_grad():
            for k, p in ours.items():
                if p.shape != theirs[k].shape:
                    raise CheckpointError(f"{path}: {k} is {tuple(theirs[k].shape)}, this run has {tuple(p.shape)}")
                p.copy_(theirs[k])
        try:
            optimizer_from_tensors(self.optimizer, {k.removeprefix("optimizer."): v for k, v in tensors.items()
                                                    if k.startswith("optimizer.")}, metadata["optimizer"])
            self.scheduler.load_state_dict(json.loads(metadata["scheduler"]))
            if metadata.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(json.loads(metadata["scaler"]))
            self.step, self.epoch = int(metadata["step"]), int(metadata["epoch"])
            distributed.restore_rank_rng(tensors, (self.cfg.seed, "dropout", self.step), self.device)
            self.batch_in_epoch = int(metadata["batch_in_epoch"])
            if int(metadata.get("micro_batch", self.cfg.batch * self.ranks)) != self.cfg.batch * self.ranks:
                self.batch_in_epoch = self.data.resume_position(self.epoch, self.batch_in_epoch, self.ranks,
                                                                int(metadata["batches_in_epoch"]))
        except (KeyError, ValueError, RuntimeError) as e:  # ValueError includes a JSONDecodeError
            raise CheckpointError(f"{path}: an incomplete or inconsistent LoRA training checkpoint "
                                  f"({type(e).__name__}: {e})") from None
        if self.epoch >= self.cfg.epochs:  # nothing left to train: say so rather than exit 0 having done nothing
            raise ValueError(f"--epochs {self.cfg.epochs}: the run in {path} has trained {self.epoch} epochs; --epochs "
                             f"is the total, so give more (--epochs {self.epoch + 10} trains 10 more)")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA training checkpoint's tensors and metadata; another kind of file is a CheckpointError."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a minigen LoRA training checkpoint (format "
                              f"{metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    return tensors, metadata
