"""`make bench-gpu`: the GPU suite in one command, under 8 minutes on one H100/H200. Each bench of `bench/` runs with
its full-size GPU settings, minigen beside its reference in the same process (diffusers + peft, diffusers' pipeline,
pytorch-fid, the PyTorch DCGAN example's step), and the memory plan's prediction is set beside the measured peak of
the same LoRA training steps. Writes a Markdown report (each bench's table, then a summary) and the same as JSON.

    python bench/bench_gpu.py [--out bench-gpu]          # on a GPU: bench-gpu.md, bench-gpu.json
    python bench/bench_gpu.py --smoke                     # the same script on the CPU with tiny configs (the tests)

A bench that fails (out of memory, say) is reported with its error and the suite goes on. With --budget-s a bench
whose estimated seconds (ESTIMATE_S, or a previous report's measured ones with --estimates) would not fit in what is
left is skipped, and the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import full_models  # noqa: E402
from minigen.finetune.config import LoRATrainConfig  # noqa: E402
from minigen.finetune.memory_plan import GB, _two_steps, model_configs, plan_lora_step  # noqa: E402

# (what it measures, bench module, its flags on a GPU, its flags in the CPU smoke run)
SUITE = [
    ("SDXL UNet forward and forward+backward, bf16, 1024x1024", "bench_unet",
     ["--device", "cuda", "--full", "--dtypes", "bf16", "--repeats", "3"],
     ["--latent", "8", "--dtypes", "fp32", "--repeats", "1", "--no-backward"]),
    ("LoRA training step, rank 4, 1024x1024, bf16, with and without gradient checkpointing", "bench_lora",
     ["--device", "cuda", "--full", "--repeats", "3"],
     ["--latent", "8", "--repeats", "1"]),
    ("SDXL pipeline, 1024x1024, 30 Euler steps, CFG 5, bf16", "bench_sample",
     ["--pipeline", "--device", "cuda", "--full", "--repeat", "2"],
     ["--pipeline", "--repeat", "1", "--steps", "2"]),
    ("FID: feature extraction, Fréchet step, fid.py end to end", "bench_fid",
     ["--device", "cuda", "--images", "1000", "--batch-size", "100"],
     ["--images", "4", "--batch-size", "4", "--workers", "1", "--frechet-dims", "32"]),
    ("Speed switches against their defaults (minigen/speed.py): SDXL UNet, LoRA step and VAE at 1024x1024 bf16, "
     "DCGAN 64x64", "bench_speed",
     ["--device", "cuda", "--full", "--repeats", "3", "--compile"],
     ["--repeats", "1"]),
    ("DCGAN training step, 64x64, widths 64, batch 128", "bench_gan",
     ["--device", "cuda", "--ngf", "64", "--ndf", "64", "--batch", "128", "--iters", "20"],
     ["--ngf", "8", "--ndf", "8", "--batch", "4", "--iters", "1"]),
]


# Seconds each part is expected to take on one H100, guessed before any was measured (no GPU has been lent yet): the
# GPU work of each bench (random inits on the GPU, the passes it times at bf16 speeds), plus for --budget-s the CPU
# side of its builds (bench/gpu_dry_run.py measures that), and for "plan" the CPU tracing of full-size SDXL
# (BENCHMARKS.md: 33-97 s each on a 2-core CPU) and the same steps on the GPU. `--estimates bench-gpu.json` replaces
# them with a run's measured seconds.
ESTIMATE_S = {"bench_unet": 30, "bench_lora": 45, "bench_sample": 60, "bench_fid": 25, "bench_speed": 120,
              "bench_gan": 15, "plan": 90}


def estimates(path: str | None) -> dict[str, float]:
    """ESTIMATE_S, with the seconds a previous report measured where it has them."""
    if path is None:
        return dict(ESTIMATE_S)
    report = json.loads(Path(path).read_text())
    measured = {b["module"]: b["seconds"] for b in report["benches"] if not b.get("skipped")}
    return ESTIMATE_S | measured | ({"plan": report["plan_seconds"]} if "plan_seconds" in report else {})


def run_bench(module: str, argv: list[str]) -> tuple[str, str | None, float]:
    """Run `module.main(argv)` here, its output shown and kept; (output, error or None, seconds)."""
    captured = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            return captured.write(text)

    start, error = time.perf_counter(), None
    try:
        with contextlib.redirect_stdout(Tee()):
            importlib.import_module(module).main(argv)
    except Exception:  # the suite goes on; the report says what failed
        error = traceback.format_exc(limit=3)
    seconds = time.perf_counter() - start
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return captured.getvalue(), error, seconds


def plan_against_measured(smoke: bool) -> list[dict]:
    """The memory plan of LoRA training steps beside their measured peak: CUDA's max_memory_allocated on a GPU; in
    the smoke run the same steps on real CPU tensors, counted by the plan's own tracker."""
    rows = []
    for checkpointing in (True,) if smoke else (True, False):
        cfg = LoRATrainConfig(model="random:tiny" if smoke else "random:sdxl-base", resolution="64" if smoke else "1024",
                              rank=16, mixed_precision="bf16", gradient_checkpointing=checkpointing, batch=1)
        plan = plan_lora_step(cfg)
        if smoke:
            measured = plan_lora_step(cfg, fake=False).peak
        else:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.device("cuda"):
                _two_steps(cfg, model_configs(cfg.model), 1024, 1024)
            measured = torch.cuda.max_memory_allocated() - base
            gc.collect()
            torch.cuda.empty_cache()
        rows.append({"setting": plan.setting, "planned_gb": plan.peak / GB, "measured_gb": measured / GB,
                     "ratio": plan.peak / measured, "plan_seconds": plan.seconds})
    return rows


def fid_images(folder: Path, n: int, side: int) -> list[str]:
    """The FID bench's images, made here: `n` random pictures of side x side (speed needs no real pictures, and a
    machine with no network has no built-in dataset). Without --weights the bench finds minigen's Inception weights,
    or times random ones and says so."""
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray((torch.rand(side, side, 3, generator=generator) * 255).byte().numpy()).save(images / f"{i}.png")
    return ["--data", str(images)]


def builds_text(builds: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(builds.items())) or "-"


def status(result: dict) -> str:
    return f"skipped: {result['skipped']}" if result.get("skipped") else "failed" if result["error"] else "ok"


def report(results: list[dict], plan_rows: list[dict], machine: str, plan_skipped: str | None = None) -> str:
    lines = ["# GPU suite (`make bench-gpu`)\n", f"Machine: {machine}\n"]
    for r in results:
        if r.get("skipped"):
            lines += [f"## {r['what']}\n", f"Skipped: {r['skipped']}\n"]
            continue
        lines += [f"## {r['what']}\n", f"`python bench/{r['module']}.py {' '.join(r['argv'])}` ({r['seconds']:.0f} s)\n",
                  "```", (r["output"].rstrip() or "(no output)"), "```\n"]
        if r["error"]:
            lines += ["Failed:\n", "```", r["error"].rstrip(), "```\n"]
    lines += ["## Memory plan vs measured peak (LoRA training steps)\n",
              "| setting | planned GB | measured GB | planned / measured | planning s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {p['setting']} | {p['planned_gb']:.2f} | {p['measured_gb']:.2f} | {p['ratio']:.2f} | "
              f"{p['plan_seconds']:.0f} |" for p in plan_rows]
    lines += [f"\nSkipped: {plan_skipped}"] if plan_skipped else []
    lines += ["\n## Summary\n", "| bench | seconds | status | models built (random init; given another's weights) |",
              "|---|---:|---|---|"]
    lines += [f"| {r['module']} | {r['seconds']:.0f} | {status(r)} | {builds_text(r.get('builds', {}))} |"
              for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the same suite on the CPU with tiny configs")
    p.add_argument("--out", default="bench-gpu", help="report path without suffix (.md and .json are written)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip each bench whose estimated seconds would not fit in what is left of this budget")
    p.add_argument("--estimates", help="a previous report's .json: its measured seconds as the estimates")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu.py: error: no CUDA device (use --smoke to run the suite on the CPU)", file=sys.stderr)
        return 2
    machine = (torch.cuda.get_device_name() if not args.smoke else f"CPU ({platform.processor() or platform.machine()})"
               ) + f", torch {torch.__version__}"
    results, expected, start = [], estimates(args.estimates), time.perf_counter()

    def skip_reason(part: str) -> str | None:
        """Why `part` does not fit in the budget (None: it fits, or there is none). The smoke run's parts cost a
        fraction of a GPU run's: estimates scale by 1/20 there."""
        if args.budget_s is None:
            return None
        need, left = expected[part] / (20 if args.smoke else 1), args.budget_s - (time.perf_counter() - start)
        return None if need <= left else f"estimated {need:.0f} s, {max(left, 0):.0f} s of --budget-s left"
    with tempfile.TemporaryDirectory(prefix="minigen-bench-gpu-") as tmp:
        extra = fid_images(Path(tmp), 8, 32) if args.smoke else fid_images(Path(tmp), 1000, 72)
        for what, module, gpu_argv, smoke_argv in SUITE:
            bench_argv = (smoke_argv if args.smoke else gpu_argv) + (extra if module == "bench_fid" else [])
            if reason := skip_reason(module):
                print(f"{module}: skipped: {reason}")
                results.append({"what": what, "module": module, "argv": bench_argv, "output": "", "error": None,
                                "seconds": 0.0, "skipped": reason})
                continue
            full_models.BUILDS.clear()
            output, error, seconds = run_bench(module, bench_argv)
            results.append({"what": what, "module": module, "argv": bench_argv, "output": output, "error": error,
                            "seconds": seconds, "builds": dict(full_models.BUILDS)})
        plan_start, reason = time.perf_counter(), skip_reason("plan")
        plan_rows = [] if reason else plan_against_measured(args.smoke)
        if reason:
            print(f"memory plan vs measured: skipped: {reason}")
        plan_seconds = time.perf_counter() - plan_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report(results, plan_rows, machine, reason))
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "benches": results, "plan": plan_rows,
                                                    "plan_seconds": plan_seconds, "plan_skipped": reason}, indent=1))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
