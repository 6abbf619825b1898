"""How the matrix products of a LoRA file's changes are computed on the CPU, block after block (`add_changes`):
into buffers reused from one block to the next, and on the CPU's bf16 arithmetic where that gives the same numbers."""

from __future__ import annotations

import contextlib
import math

import torch


@contextlib.contextmanager
def bf16_arithmetic(allowed: bool):
    """Within it (when `allowed`), fp32 matrix products on the CPU may run on the CPU's bf16 arithmetic: oneDNN's
    fpmath mode bf16, which rounds the inputs to bf16, multiplies them exactly and sums in fp32. For factors that
    hold bf16 values (a file stored in bf16: nothing to round) that is the fp32 product itself, up to the order of
    the sum; measured 2-3x MKL's fp32 rate on the 2-core AMD EPYC (BENCHMARKS.md)."""
    if not (allowed and torch.backends.mkldnn.is_available()):
        yield
        return
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved


class Scratch:
    """fp32 buffers reused for the intermediate products of one block of rows after another (`add_changes`): fresh
    memory of a block's size costs a page fault per 4 KiB each time it is allocated (measured: 2,000 faults and 4x
    the time for a 4 MiB LoHa block), so a whole file's layers share these. `take(slot, shape)` is a view of the
    slot's buffer, grown when too small."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < n or buffer.device != device:
            buffer = self.buffers[slot] = torch.empty(n, device=device)
        return buffer[:n].view(shape)
