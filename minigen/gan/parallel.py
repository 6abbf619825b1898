"""The DCGAN under `torchrun`: what `trainer.py` adds to minigen/distributed.py's helpers.

    torchrun --nproc_per_node 4 train_gan.py --config configs/demo.conf --device cuda --sync-bn

Every rank holds the whole of G and D and trains on its rows of each global batch (--batch x ranks images; an epoch
is one pass over the data). How the ranks stay one run:
  - The same random numbers. Every rank keeps the run's one generator in the same state and draws the random numbers
    (flips, noise, soft labels, mixing weights) of the whole global batch, then keeps its own rows: N ranks of batch b
    draw exactly what one process of batch N x b draws, and a single process draws what it always has.
  - The same gradients. Each rank's loss is its rows' mean divided by N; after each backward pass `sum_gradients`
    adds them up in one flat exchange: the gradient of the global batch's mean loss, on every rank. (Not
    DistributedDataParallel: D runs three times per iteration, on reals, on fakes and for G's loss, D's weights are
    frozen during G's step, and WGAN-GP differentiates through D with autograd.grad, none of which DDP's per-forward
    bookkeeping allows without find_unused_parameters and static-graph flags. G and D are small: one exchange after
    the backward pass costs little next to it; bench/bench_ddp.py measures it.)
  - The same statistics, with --sync-bn: `SyncBatchNorm2d` normalises over the global batch. Without it each rank's
    batch norm sees only its own rows, like a single process of batch b.
  - The same decisions: after each iteration `agree` sums the losses and every rank's stop request (Ctrl-C,
    SIGTERM), so a NaN on any rank stops all of them and a signal to one rank stops all after the same iteration.
Only rank 0 writes (log, grids, curves, checkpoints) and runs the epoch hooks (FID).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .. import distributed


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training passes normalise with the mean and variance of the global batch: one exchange of
    the per-channel sums per layer and pass, differentiable. A pass without gradients (the grid, FID samples, which
    rank 0 draws alone) normalises its own batch, as does a single process.

    # Patch: torch.nn.SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), so gloo could not run
    it; this sums the batch moments with one all-reduce instead, on every device, so CPU tests cover what GPUs run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if not (self.training and torch.is_grad_enabled() and distributed.active()):
            return super().forward(x)
        c = x.shape[1]
        count = x.new_tensor([x.numel() // c])  # (1,) values per channel on this rank
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count])  # (2C + 1,)
        total = distributed.SumAcrossRanksWithGrad.apply(local, "the other ranks' batch-norm statistics")
        n = total[-1].detach()
        mean = total[:c] / n  # (C,)
        var = total[c:2 * c] / n - mean * mean  # (C,) biased, as batch norm normalises
        with torch.no_grad():  # the running averages, as BatchNorm2d keeps them (unbiased variance)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        return (x - mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of `model` into a SyncBatchNorm2d, in place (the same weights, buffers and keys)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SyncBatchNorm2d
    return model


def my_rows(total: int) -> slice:
    """This rank's rows of a global batch of `total` (an equal share each)."""
    part = distributed.my_part(range(total), total // distributed.world_size())[1]
    return slice(part.start, part.stop)


def agree(stats: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
    """The iteration's statistics as means over the ranks (a NaN on one rank is a NaN on all), and whether any rank
    was asked to stop: one small exchange per iteration. The learning rates, the same everywhere, are kept."""
    names = ["loss_d", "loss_g", "d_real", "d_fake"]
    values = torch.tensor([stats[k] for k in names], dtype=torch.float64)  # (4,)
    total, stop_all = distributed.sum_and_stop(values, stop, "the other ranks' losses and stop requests")
    ranks = distributed.world_size()
    return stats | {k: (total[i] / ranks).item() for i, k in enumerate(names)}, stop_all


def resume_position(batch_index: int, saved_global_batch: int, global_batch: int) -> int:
    """Where in its epoch a run continues when the checkpoint's global batch (--batch x ranks) differs from this
    run's: after the images already seen, rounded down to a whole batch (a few may be seen twice), with a warning."""
    if saved_global_batch == global_batch:
        return batch_index
    seen = batch_index * saved_global_batch
    warnings.warn(f"the checkpoint's global batch was {saved_global_batch}, this run's is {global_batch} (--batch x "
                  f"ranks): not an exact resume; continuing after image {seen // global_batch * global_batch} of the "
                  "epoch's order", stacklevel=2)
    return seen // global_batch
