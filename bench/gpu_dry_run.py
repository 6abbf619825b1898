"""Does `make bench-gpu` fit 8 minutes on one H100? An estimate made on the CPU, before any GPU is lent.

    python bench/gpu_dry_run.py [--budget-s 480]        # one table; exit 0 when the total fits the budget

Each row says where its figure comes from:
  - counted: the models each bench builds, by kind (random inits; copies handed another model's tensors), from a run
    of the smoke suite (`bench_gpu.py --smoke`), which takes the GPU run's code paths with tiny sizes;
  - measured here: CPU work the GPU run does too, at full size: constructing each model's modules (on the meta
    device: the Python side of a build, which a GPU does not speed up), and the memory plan's traces of full-size
    SDXL LoRA steps (fake tensors, CPU only; the GPU run traces two);
  - estimated: the GPU work of each bench (random inits and the passes it times): bench_gpu.ESTIMATE_S, guesses
    until a GPU run measures them.
The smoke run is not the GPU run everywhere: bench_lora times two checkpointing settings on a GPU (one in the smoke
run: its copies are doubled here), bench_sample's smoke run draws the tests' tiny pipelines (its GPU builds are read
from `full_pipelines` instead: GPU_BUILDS), and bench_speed adds --compile rows (inside its estimate).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu  # noqa: E402

COPIES_ON_GPU = {"bench_lora": 2}  # how many times the smoke run's copies the GPU run makes
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
GPU_BUILDS = {"bench_sample": {f"{side} {part}{copy}": 1 for part in PARTS  # bench_sample.full_pipelines
                               for side, copy in (("diffusers", ""), ("minigen", " (same weights)"))}}
PLAN_TRACES = 2  # plan_against_measured's full-size settings: with and without gradient checkpointing


def counted_builds() -> dict[str, dict[str, int]]:
    """Each bench's model builds by kind, from a smoke run of the suite."""
    with tempfile.TemporaryDirectory(prefix="minigen-dry-run-") as tmp:
        if bench_gpu.main(["--smoke", "--out", str(Path(tmp) / "smoke")]) != 0:
            raise RuntimeError("the smoke suite failed: see its report above")
        report = json.loads((Path(tmp) / "smoke.json").read_text())
    return {b["module"]: b["builds"] for b in report["benches"]} | GPU_BUILDS


def construction_seconds() -> dict[str, float]:
    """Seconds to construct each full-size model's modules on the meta device, by the kind names benches count."""
    import diffusers
    import transformers

    from minigen.sd.configs import get_config
    from minigen.sd.model import build_model

    configs, plain = get_config("sdxl-base"), lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    makers = {f"minigen {part}": (lambda part=part: build_model(part, configs[part])) for part in configs
              if part != "scheduler"}
    makers |= {"diffusers unet": lambda: diffusers.UNet2DConditionModel(**plain(configs["unet"])),
               "diffusers vae": lambda: diffusers.AutoencoderKL(**plain(configs["vae"])),
               "diffusers text_encoder": lambda: transformers.CLIPTextModel(
                   transformers.CLIPTextConfig(**configs["text_encoder"])),
               "diffusers text_encoder_2": lambda: transformers.CLIPTextModelWithProjection(
                   transformers.CLIPTextConfig(**configs["text_encoder_2"]))}
    seconds = {}
    for kind, make in makers.items():
        with torch.device("meta"):
            make()  # once untimed: the libraries' lazy imports
            start = time.perf_counter()
            make()
        seconds[kind] = time.perf_counter() - start
    return seconds | {"vae": seconds["minigen vae"]}  # bench_speed's kind for minigen's VAE


def plan_trace_seconds() -> float:
    """One full-size SDXL LoRA step's plan (rank 16, bf16, 1024x1024, gradient checkpointing), traced here."""
    from minigen.finetune.config import LoRATrainConfig
    from minigen.finetune.memory_plan import plan_lora_step

    cfg = LoRATrainConfig(model="random:sdxl-base", resolution="1024", rank=16, mixed_precision="bf16",
                          gradient_checkpointing=True, batch=1)
    start = time.perf_counter()
    plan_lora_step(cfg)
    return time.perf_counter() - start


def rows(builds: dict[str, dict[str, int]], construct: dict[str, float], trace_s: float) -> list[tuple]:
    """(part, count, seconds each, seconds, where from) for the table, the total last."""
    table = []
    for module, counts in builds.items():
        table.append((f"{module}: GPU work", 1, bench_gpu.ESTIMATE_S[module], bench_gpu.ESTIMATE_S[module],
                      "estimated"))
        for kind, n in sorted(counts.items()):
            copies = kind.endswith("(same weights)")
            n *= COPIES_ON_GPU.get(module, 1) if copies else 1
            each = construct[kind.removesuffix(" (same weights)").lower()]
            table.append((f"{module}: construct {kind}", n, each, n * each, "counted x measured here"))
    table.append(("memory plan: full-size traces", PLAN_TRACES, trace_s, PLAN_TRACES * trace_s, "measured here"))
    table.append(("memory plan: the same steps on the GPU", 1, 10.0, 10.0, "estimated"))
    return table + [("total", "", "", sum(r[3] for r in table), "")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0, help="the time the suite must fit (default 8 minutes)")
    args = p.parse_args(argv)
    table = rows(counted_builds(), construction_seconds(), plan_trace_seconds())
    print("| part | count | s each | s | from |\n|---|---:|---:|---:|---|")
    for part, count, each, total, source in table:
        print(f"| {part} | {count} | {each if each == '' else f'{each:.1f}'} | {total:.1f} | {source} |")
    total = table[-1][3]
    fits = total <= args.budget_s
    print(f"estimated {total:.0f} s on one H100: {'fits' if fits else 'does not fit'} --budget-s {args.budget_s:.0f}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
