"""Several processes, one job: what LoRA and GAN training, `fid.py` and `eval.py` share under `torchrun`.

    torchrun --nproc_per_node 4 train_lora.py ...                                    # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_lora.py ...

torchrun starts one process per GPU (a "rank") and tells each, through RANK, LOCAL_RANK and WORLD_SIZE, who it is.
`process_group` joins them (NCCL on GPUs, gloo on the CPU) and gives each rank its own device (cuda:LOCAL_RANK);
without torchrun, or with one process, nothing is joined and every helper here is the identity, so a plain
`python train_lora.py` runs exactly as before.

The rules the callers keep:
  - Work is split by position, not by rank: `share` gives each rank a contiguous block of the items (whole batches),
    `my_part` its slice of one round. A seed that must not depend on how the work is split (one training sample's
    noise, one image's latent sample) comes from `derived_seed(seed, ..., position)`, so N ranks draw what one
    process draws.
  - Every rank calls the same collectives in the same order (a rank with nothing to do passes empty data), and each
    call says what it waits for: when another rank dies or stalls, the error names it instead of hanging. The wait is
    bounded by MINIGEN_DIST_TIMEOUT seconds (default 1800).
  - Only rank 0 writes files; ranks > 0 keep their warnings to themselves (rank 0 already shows the same ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MINIGEN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # long enough for rank 0 to write a checkpoint or draw the validation grid alone


def launched() -> bool:
    """True in a process torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The rank that prints and writes files (the only one without a process group)."""
    return rank() == 0


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def rank_label() -> str:
    """' (rank R of N)' in a process torchrun started as one of several, else '': for error lines."""
    return f" (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})" if launched() else ""


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join the job's process group when torchrun started several processes; yield the device this rank uses
    (`cuda` becomes cuda:LOCAL_RANK). Outside torchrun: yield `device` and do nothing."""
    if not launched():
        yield device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s): "
                             "give torchrun --nproc_per_node at most that many")
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    if rank() > 0:
        warnings.simplefilter("ignore")
    try:
        yield device
    finally:
        dist.destroy_process_group()


# ---- collectives: each names what it waits for --------------------------------------------------------------------

@contextlib.contextmanager
def waiting_for(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, or did not arrive within the timeout) into one line naming the wait."""
    try:
        yield
    except RuntimeError as e:  # gloo's and NCCL's errors (DistBackendError is a RuntimeError)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConnectionError(f"rank {rank()} stopped waiting for {what} (another rank failed, or took more than "
                              f"{TIMEOUT_ENV}={timeout_s():g} s): {first_line}") from None


def collective_device() -> torch.device:
    """Where a collective's tensors must be: the rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(value: torch.Tensor, what: str) -> torch.Tensor:
    """The sum of `value` over the ranks (a new tensor, on value's device); `value` itself with one process."""
    if not active():
        return value
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    total = value.detach().to(collective_device(), dtype, copy=True)  # a copy: all_reduce works in place
    with waiting_for(what):
        dist.all_reduce(total)
    return total.to(value.device)


def sum_and_stop(values: torch.Tensor, stop: bool, what: str) -> tuple[torch.Tensor, bool]:
    """`values` (N,) summed over the ranks, and whether any rank asks to stop (Ctrl-C, SIGTERM): one exchange, so a
    training loop learns both at the same step on every rank."""
    votes = torch.cat([values.detach().reshape(-1), values.new_tensor([float(stop)])])  # (N + 1,)
    total = sum_across_ranks(votes, what)
    return total[:-1], bool(total[-1] > 0)


class SumAcrossRanksWithGrad(torch.autograd.Function):
    """`sum_across_ranks` that autograd can pass through: every rank's input feeds every rank's output, so the gradient
    of each input is the sum over the ranks of the outputs' gradients (one more exchange in the backward pass)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, what: str) -> torch.Tensor:
        ctx.what = what
        return sum_across_ranks(value, what)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return sum_across_ranks(grad, f"the gradients of {ctx.what}"), None


def all_true(flag: bool, what: str) -> bool:
    """True when `flag` is true on every rank (one vote each)."""
    votes = sum_across_ranks(torch.tensor(float(flag)), what)
    return int(votes.item()) == world_size()


def sum_gradients(params: Sequence[torch.Tensor], what: str = "the other ranks' gradients") -> int:
    """Replace each parameter's gradient by its sum over the ranks, in one flat all-reduce (a parameter without a
    gradient on a rank, e.g. one that saw no samples, counts as zeros). Each sum is copied back into the gradient
    tensor, which keeps its memory layout: a channels-last weight's gradient stays channels-last, as fused optimizers
    require (a contiguous gradient there pairs the wrong elements). Returns the bytes exchanged (0 alone)."""
    if not active() or not params:
        return 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # zeros_like preserves the parameter's layout
    dtype = torch.float64 if any(p.grad.dtype == torch.float64 for p in params) else torch.float32  # bf16 in fp32
    flat = torch.cat([p.grad.reshape(-1).to(dtype) for p in params]).to(collective_device())  # logical order
    with waiting_for(what):
        dist.all_reduce(flat)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view(p.shape))  # copy_ writes through the gradient's own strides
            offset += n
    return flat.numel() * flat.element_size()


def broadcast_from_main(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Overwrite each tensor with rank 0's (in place)."""
    if not active():
        return
    with waiting_for(what), torch.no_grad():
        for t in tensors:
            buffer = t.detach().to(collective_device())
            dist.broadcast(buffer, 0)
            t.copy_(buffer)


def gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] with one process."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    with waiting_for(what):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, what: str) -> Any:
    """Rank 0's `obj` on every rank (the others pass anything, e.g. None)."""
    if not active():
        return obj
    box = [obj]
    with waiting_for(what):
        dist.broadcast_object_list(box, 0)
    return box[0]


# ---- per-rank random state in a checkpoint ---------------------------------------------------------------------

def rank_rng_states(device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states, for rank 0 to save: `torch_rng` (rank 0's CPU state, the key one process has
    always written) and `torch_rng.R` for rank R > 0; on a GPU also `cuda_rng[.R]`, the state of the rank's CUDA
    generator, which draws what CUDA tensors draw without a generator (LoRA dropout's masks). A collective: every
    rank calls it."""
    cuda = torch.device(device).type == "cuda"
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
    states = {}
    for r, (cpu, gpu) in enumerate(gather_objects(mine, "the other ranks' random states")):
        suffix = f".{r}" if r else ""
        states["torch_rng" + suffix] = cpu
        if gpu is not None:
            states["cuda_rng" + suffix] = gpu
    return states


def restore_rank_rng(tensors: dict[str, torch.Tensor], fallback_seed: tuple,
                     device: str | torch.device = "cpu") -> bool:
    """Set this rank's torch RNGs (the CPU's; on a GPU, the CUDA generator's too) from a checkpoint's
    `rank_rng_states`; a state the checkpoint does not have (it was written by fewer ranks, or on a CPU) is seeded
    with derived_seed(*fallback_seed, rank) instead. True when every state was restored."""
    suffix = f".{rank()}" if rank() else ""
    seed = derived_seed(*fallback_seed, rank())
    restored = "torch_rng" + suffix in tensors
    if restored:
        torch.set_rng_state(tensors["torch_rng" + suffix])
    else:
        torch.manual_seed(seed)  # the CUDA generators too
    if torch.device(device).type == "cuda":
        if "cuda_rng" + suffix in tensors:
            torch.cuda.set_rng_state(tensors["cuda_rng" + suffix], device)
        else:
            torch.cuda.manual_seed(seed)
            restored = False
    return restored


# ---- splitting the work -------------------------------------------------------------------------------------------

def my_part(items: Sequence, per_rank: int) -> tuple[int, Sequence]:
    """This rank's slice of a round of `per_rank` items per rank: (position of its first item, its items). The last
    round may leave a rank fewer items, or none."""
    start = min(rank() * per_rank, len(items))
    return start, items[start: start + per_rank]


def share(items: Sequence, block: int = 1) -> tuple[int, Sequence]:
    """This rank's contiguous share of all `items`, in whole blocks of `block` (a batch keeps the items it has in one
    process, so batched results are the same): (position of its first item, its items)."""
    blocks_per_rank = math.ceil(math.ceil(len(items) / block) / world_size())
    return my_part(items, blocks_per_rank * block)


def derived_seed(*parts: int | str) -> int:
    """A 64-bit seed determined by `parts` (e.g. run seed, epoch, batch, position in the global batch), and by nothing
    else: not by the rank that uses it nor by what was drawn before."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
