"""What applying a full-size SDXL LoRA file of each format costs `sample.py --lora`: read the file, match its layers,
compute each layer's change and fuse it into the weights (`load_lora`, what `Pipeline.add_lora` runs).

The full-size SDXL UNet and both text encoders are built with random weights, fp32 as `sample.py` holds them on the
CPU (13.6 GB; `--dtype bf16`: 6.8 GB). Each format's file
is made with LyCORIS' own shape rules (`lycoris.functional`'s LoHa and LoKr `weight_gen`, a test-only dependency) on the layers
LyCORIS' "full" preset wraps (every Linear and Conv2d of the UNet's transformers, resnets and samplers, conv_in/out,
the time embedding; the text encoders' attention and MLP), except the plain LoRA file, which has the layers
sd-scripts wraps by default (the UNet's transformers, the text encoders). Written to a temporary folder (read back
from the page cache), applied as `sample.py --lora` applies it (every layer's change added into its weight in place,
`removable=False`) and timed (wall and process CPU seconds, the median of `--repeat` runs), one format after the
other on the same weights.
`--step-cost SIZE` then times a UNet call with and without a plain LoRA on the fly (how `eval.py` holds one, to take
it off again): what on-the-fly application would add to every sampling step.
`full` (`diff`) files are the size of the model, and their change is one addition per weight: not benchmarked.

    python bench/bench_lora_formats.py                  # rank 16 (convolutions 8)
    python bench/bench_lora_formats.py --formats LoRA LoCon --step-cost 512
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigen.io import save_safetensors  # noqa: E402
from minigen.lora.layers import PRESETS  # noqa: E402
from minigen.sd.configs import get_config  # noqa: E402
from minigen.sd.lora_reading import load_lora  # noqa: E402
from minigen.sd.model import build_model  # noqa: E402

PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
FULL_UNET = (r"(attentions|resnets|downsamplers|upsamplers)\.", r"^conv_(in|out)$", r"^time_embedding\.")
TEXT = (r"encoder\.layers\.\d+\.(self_attn|mlp)\.",)


def layers(models: dict[str, nn.Module], unet_patterns) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module path: weight}} of the Linear and Conv2d layers a file of this kind covers."""
    found = {}
    for component, model in models.items():
        patterns = [re.compile(p) for p in (unet_patterns if component == "unet" else TEXT)]
        found[component] = {path: m.weight for path, m in model.named_modules()
                            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.search(path) for p in patterns)}
    return found


def parts(fmt: str, weight: torch.Tensor, rank: int, conv_rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's tensors as LyCORIS makes them for `weight`'s shape (values random: the cost is in the shapes)."""
    from lycoris.functional import loha, lokr

    meta = torch.empty(weight.shape, device="meta")
    r = conv_rank if weight.dim() == 4 and weight.shape[2:] != (1, 1) else rank
    if fmt in ("LoRA", "LoCon", "DoRA"):  # down (r, in[, kh, kw]), up (out, r[, 1, 1])
        out = {"lora_down.weight": torch.randn(r, *weight.shape[1:]) * 0.01,
               "lora_up.weight": torch.randn(weight.shape[0], r, *[1] * (weight.dim() - 2))}
        if fmt == "DoRA":
            out["dora_scale"] = torch.rand(weight.shape[0], *[1] * (weight.dim() - 1)) + 0.5
    elif fmt == "LoHa":
        w1b, w1a, w2b, w2a, _, _ = loha.weight_gen(meta.flatten(1), r, tucker=False)  # down (r, in), up (out, r)
        out = {"hada_w1_a": torch.randn(w1a.shape), "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    elif fmt == "LoKr":
        w1, w1a, w1b, w2, w2a, w2b, t2 = lokr.weight_gen(meta, r, tucker=False)
        out = {name: t for name, t in (("lokr_w1", w1), ("lokr_w1_a", w1a), ("lokr_w1_b", w1b), ("lokr_w2", w2),
                                       ("lokr_w2_a", w2a), ("lokr_w2_b", w2b)) if t is not None}
    else:  # GLoRA: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in[, kh, kw])
        n_in = weight.shape[1]
        out = {"a1.weight": torch.randn(n_in, r) * 0.01, "a2.weight": torch.randn(r, n_in) * 0.01,
               "b1.weight": torch.randn(weight.shape[0], r) * 0.01, "b2.weight": torch.randn(r, *weight.shape[1:])}
    out["alpha"] = torch.tensor(float(r))
    return {k: v.to(dtype) if k != "alpha" else v for k, v in out.items()}


def lora_file(path: Path, fmt: str, models: dict, rank: int, conv_rank: int,
              dtype: torch.dtype = torch.bfloat16) -> int:
    """Write one format's file; returns its number of layers."""
    targets = layers(models, PRESETS["kohya"] if fmt == "LoRA" else FULL_UNET)
    tensors = {}
    for component, weights in targets.items():
        for module, weight in weights.items():
            name = PREFIX[component] + module.replace(".", "_")
            tensors |= {f"{name}.{part}": t.contiguous() for part, t in parts(fmt, weight, rank, conv_rank, dtype).items()}
    save_safetensors(tensors, path)
    return sum(len(w) for w in targets.values())


def unet_call_seconds(unet: nn.Module, size: int) -> float:
    """Wall seconds of one UNet call on a guided batch (2 latents) of a size x size image, SDXL's conditioning."""
    dtype = next(unet.parameters()).dtype
    latents = torch.randn(2, 4, size // 8, size // 8, dtype=dtype)
    context = torch.randn(2, 77, 2048, dtype=dtype)
    pooled, time_ids = torch.randn(2, 1280, dtype=dtype), torch.zeros(2, 6, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        unet(latents, 500, context, text_embeds=pooled, time_ids=time_ids)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["LoRA", "LoCon", "LoHa", "LoKr", "DoRA", "GLoRA"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--conv-rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="apply each file this many times; the median run is shown")
    p.add_argument("--file-dtype", choices=["bf16", "fp16"], default="bf16",
                   help="the files' (LyCORIS and sd-scripts save either; bf16 factors are multiplied on bf16 arithmetic)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the model's (sample.py's on the CPU: fp32)")
    p.add_argument("--step-cost", type=int, metavar="SIZE", help="also time one guided UNet call at SIZE x SIZE "
                   "without a LoRA, with the plain LoRA fused, and with it on the fly (eval.py's way)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    configs = get_config("sdxl-base")
    models = {"unet": build_model("unet", configs["unet"]), "te1": build_model("text_encoder", configs["text_encoder"]),
              "te2": build_model("text_encoder_2", configs["text_encoder_2"])}
    torch.set_default_dtype(torch.float32)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; full-size SDXL UNet + text encoders, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        files = {fmt: Path(tmp) / f"{fmt}.safetensors" for fmt in args.formats}
        file_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.file_dtype]
        layer_counts = {fmt: lora_file(path, fmt, models, args.rank, args.conv_rank, file_dtype)
                        for fmt, path in files.items()}
        print("| format | layers | file MB | wall s | CPU s |")
        print("|---|---:|---:|---:|---:|", flush=True)
        for fmt, path in files.items():  # all files made first: only the applying is timed, format after format
            times = []
            for _ in range(args.repeat):
                path.read_bytes()  # in the page cache, as a file just downloaded or used before
                wall, cpu = time.perf_counter(), time.process_time()
                load_lora(path, models, removable=False)  # sample.py's way; the weights keep each format's change
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
            wall, cpu = sorted(times)[len(times) // 2]  # the median run
            print(f"| {fmt} | {layer_counts[fmt]} | {path.stat().st_size / 1e6:.0f} | {wall:.2f} | {cpu:.2f} |",
                  flush=True)
            path.unlink()
        if args.step_cost:
            path = Path(tmp) / "LoRA.safetensors"
            lora_file(path, "LoRA", models, args.rank, args.conv_rank)
            unet_call_seconds(models["unet"], args.step_cost)  # warm-up
            fused = unet_call_seconds(models["unet"], args.step_cost)
            load_lora(path, models)  # removable: the plain LoRA layers on the fly
            on_the_fly = unet_call_seconds(models["unet"], args.step_cost)
            print(f"one guided UNet call at {args.step_cost}x{args.step_cost}: {fused:.2f} s with the LoRAs fused, "
                  f"{on_the_fly:.2f} s with a plain LoRA on the fly as well")


if __name__ == "__main__":
    main()
