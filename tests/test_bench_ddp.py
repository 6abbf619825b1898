"""`python bench/bench_ddp.py --smoke`: one and two gloo processes, GAN and LoRA steps, end to end on the CPU. It
checks what the table says about the exchange, not any speed: the LoRA step all-reduces exactly its adapters' bytes
(not the UNet's), the GAN step its gradients and a little more (batch-norm moments, losses), one process nothing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_ddp  # noqa: E402


def test_the_ddp_bench_runs_and_counts_the_exchanged_bytes():
    lines = bench_ddp.main(["--smoke"]).splitlines()
    rows = {(cells[0], int(cells[1])): cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert sorted(rows) == [("GAN", 1), ("GAN", 2), ("LoRA", 1), ("LoRA", 2)]

    def number(text):
        return int(text.removesuffix(" B").replace(",", ""))
    exchanged, params = {k: number(r[6]) for k, r in rows.items()}, {k: number(r[7]) for k, r in rows.items()}
    assert exchanged[("GAN", 1)] == exchanged[("LoRA", 1)] == 0
    assert exchanged[("LoRA", 2)] == params[("LoRA", 2)] < 500_000  # the tiny UNet's own weights are ~21 MB
    assert params[("GAN", 2)] < exchanged[("GAN", 2)] < 1.1 * params[("GAN", 2)]
    assert rows[("GAN", 2)][2] == "4" and rows[("LoRA", 1)][5] == "100%"  # global batch 2 x 2; the baseline
