"""Text to image with a Stable Diffusion checkpoint (SD 1.x, 2.x, SDXL and its refiner): the images diffusers gives
for a seed.

    python sample.py --model sd_xl_base_1.0.safetensors --prompt "a photo of an astronaut riding a horse on mars" \
        --steps 30 --cfg 5 --sampler "DPM++ 2M Karras" --seed 0 --num 4 --lora style.safetensors:0.8 --out outputs/
    python sample.py --from-png outputs/0-002.png --steps 40      # the same image again, but with 40 steps
    python sample.py --model sd_xl_refiner_1.0.safetensors --prompt "..." --init-image outputs/0-002.png \
        --strength 0.3 --seed 0                                   # refined by the SDXL refiner (img2img)

--model: a diffusers folder, a single-file checkpoint, or random:tiny (a random model, to try things in seconds). One
`--seed` draws the noise of the whole batch (as diffusers' `generator=torch.Generator("cpu").manual_seed(seed)` with
`num_images_per_prompt`); with no seed a random one is chosen and printed. Images are written as
<out>/<seed>-000.png, <seed>-001.png, ..., numbered on past those already there (nothing is replaced), each holding
its settings (A1111's `parameters` text and minigen's JSON, see minigen/sd/png_info.py). --sampler takes minigen's, A1111's and ComfyUI's names. --init-image turns it into img2img
(diffusers' StableDiffusionXLImg2ImgPipeline; the refiner's aesthetic scores: --aesthetic-score,
--negative-aesthetic-score). --from-png IMG redraws IMG from its settings; flags after it override.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

from minigen import cli, speed
from minigen.atomic import check_can_create
from minigen.finetune.memory_plan import check_fits, model_configs, plan_sampling
from minigen.sd.png_info import file_hashes, png_text, read_png_settings
from minigen.diffusion.names import karras_of, resolve_sampler
from minigen.sd.configs import default_size
from minigen.sd.lora_files import parse_lora_spec
from minigen.sd.model import RANDOM
from minigen.sd.pipeline import (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, Pipeline, check_settings,
                                 load_init_image, save_images)

# The flags a PNG keeps (minigen/sd/png_info.py): every one that changes the pixels. Not --allow-pickle: a picture must
# not grant permission to unpickle. Not --device: a redraw may run elsewhere (bitwise equal on the same device).
SETTINGS = ("model", "prompt", "negative", "steps", "cfg", "rescale", "sampler", "karras", "eta", "seed", "height",
            "width", "num", "lora", "vae", "init_image", "strength", "original_size", "crop_top_left", "target_size",
            "aesthetic_score", "negative_aesthetic_score", "dtype",
            "vae_tiling")  # not the other speed switches: they change nothing but rounding
SWITCHES = ("karras", "vae_tiling")  # flags without a value
PAIRS = ("original_size", "crop_top_left", "target_size")  # flags of two numbers
DEFAULT_STRENGTH = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline's


def strength(text: str) -> float:
    value = cli.number(float, 0, 1)(text)
    if value == 0:
        raise ValueError("must be in (0, 1], got 0")
    return value


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0], exit_on_error=exit_on_error)
    p.add_argument("--from-png", metavar="IMG", help="redraw IMG from the settings in it (minigen's, or A1111's "
                   "text); flags given override them (--lora replaces its LoRAs), and --num or --seed draw the whole new batch")
    p.add_argument("--model", help="SD 1.x, 2.x, SDXL or the SDXL refiner: a diffusers folder, a single .safetensors "
                   "file (its architecture is read from the weights), or random:tiny / random:tiny-refiner / "
                   "random:tiny-sd1 / random:tiny-sd2 (required unless --from-png)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="what the model predicts, for a file that does not say (SD 2.x 768-v models: v); "
                        "default: the file's or folder's own, else eps")
    p.add_argument("--clip-skip", type=cli.number(int, 1), default=1,
                   help="A1111's CLIP skip: 1 = the last text-encoder layer, 2 = the penultimate (anime SD 1.x models)")
    p.add_argument("--prompt", help="required unless --from-png")
    p.add_argument("--negative", default=None, help="negative prompt (default: none: zero embeddings for SDXL, the "
                   "encoding of \"\" for SD 1.x/2.x, as diffusers does)")
    p.add_argument("--steps", type=cli.number(int, 1), default=30)
    p.add_argument("--cfg", type=cli.number(float, 0), default=5.0,
                   help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--rescale", type=cli.number(float, 0, 1), default=0.0,
                   help="guidance rescale in [0, 1] (Lin et al. 2023)")
    p.add_argument("--sampler", type=cli.parsed_by(resolve_sampler, "sampler"), default="euler",
                   help="ddpm, ddim, euler, euler_a, dpmpp_2m, or A1111's or ComfyUI's name (\"DPM++ 2M Karras\", "
                        "euler_ancestral); a trailing schedule name (karras, normal) sets --karras")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, dpmpp_2m)")
    p.add_argument("--eta", type=cli.number(float, 0, 1), default=0.0, help="DDIM's eta in [0, 1]")
    p.add_argument("--seed", type=cli.seed_number, default=None)
    p.add_argument("--height", type=cli.number(int, 8), default=None,
                   help="a multiple of 8 (default: the init image's, else the model's own: 1024 for SDXL, 512 for SD "
                        "1.5, 768 for SD 2.1, 32 for random:tiny)")
    p.add_argument("--width", type=cli.number(int, 8), default=None,
                   help="a multiple of 8 (default: the init image's, else the model's own: 1024 for SDXL, 512 for SD "
                        "1.5, 768 for SD 2.1, 32 for random:tiny)")
    p.add_argument("--num", type=cli.number(int, 1), default=1, help="images in the batch")
    p.add_argument("--out", default="outputs")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file (kohya, LyCORIS or peft: LoRA, LoCon, LoHa, LoKr, DoRA, full, GLoRA) and its "
                        "multiplier (default 1); repeat to stack several")
    p.add_argument("--vae", help="a replacement VAE: a file (diffusers or LDM names) or a diffusers vae/ folder")
    p.add_argument("--init-image", metavar="IMG", help="img2img: start from this image (resized to --height/--width)")
    p.add_argument("--strength", type=cli.parsed_by(strength, "strength"), default=None,
                   help=f"img2img: how much of the run to redo, in (0, 1] (default {DEFAULT_STRENGTH})")
    p.add_argument("--original-size", type=cli.number(int, 1), nargs=2, metavar=("H", "W"),
                   help="SDXL micro-conditioning: the size the picture claims to come from (default: the output's)")
    p.add_argument("--crop-top-left", type=cli.number(int, 0), nargs=2, metavar=("Y", "X"),
                   help="SDXL micro-conditioning: the crop's top-left corner (default 0 0)")
    p.add_argument("--target-size", type=cli.number(int, 1), nargs=2, metavar=("H", "W"),
                   help="SDXL micro-conditioning: the size aimed for (default: the output's; not the refiner's)")
    p.add_argument("--aesthetic-score", type=cli.number(float), default=None,
                   help=f"SDXL refiner only: the aesthetic score the prompt is conditioned on "
                        f"(default {AESTHETIC_SCORE})")
    p.add_argument("--negative-aesthetic-score", type=cli.number(float), default=None,
                   help=f"SDXL refiner only: the aesthetic score the negative prompt is conditioned on "
                        f"(default {NEGATIVE_AESTHETIC_SCORE})")
    p.add_argument("--plan", action="store_true",
                   help="print the memory the drawing needs (no weights loaded, no GPU needed), then exit")
    p.add_argument("--force", action="store_true", help="start on a GPU even when the plan says it will not fit")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep the models in CPU memory and each on the GPU only while it runs: SDXL on 8-12 GB cards "
                        "(the same images, a little slower)")
    p.add_argument("--no-hash", action="store_true",
                   help="leave the model, VAE and LoRA hashes out of the PNGs (hashing 7 GB takes a while)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled model or LoRA files (.ckpt, .bin, .pt) you trust; loaded with weights_only=True")
    cli.add_device_args(p)
    speed.add_speed_args(p, ("tf32", "compile", "channels_last", "sdpa", "vae_slicing", "vae_tiling"),
                         "the UNet (and channels-last the VAE)")
    return p


def settings_argv(settings: dict) -> list[str]:
    """Saved settings as the flags that give them, e.g. {"steps": 30, "karras": True} -> ["--steps=30", "--karras"]."""
    argv = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {key!r}")
        if value is None or value is False:
            continue
        if key in SWITCHES and value is True:
            argv.append(flag)
        elif key in PAIRS and isinstance(value, list) and len(value) == 2:
            argv += [flag, *map(str, value)]
        elif key == "lora" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            argv += [f"{flag}={spec}" for spec in value]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool) and key not in (*PAIRS, "lora",
                                                                                              *SWITCHES):
            argv.append(f"{flag}={value}")  # `=`: a value starting with '-' stays a value
        else:
            raise ValueError(f"setting {key}={value!r} is not a value of {flag}")
    return argv


def given_flags(argv: list[str]) -> set[str]:
    """The settings named on the command line (whatever their value): parsed with no defaults at all."""
    quiet = build_parser()
    for action in quiet._actions:  # argparse has no public way to drop every default
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def with_png_settings(p: argparse.ArgumentParser, argv: list[str], png: str) -> tuple[argparse.Namespace, int | None]:
    """The command line over the settings saved in `png`, and the image's place in its batch (None: write the batch)."""
    saved, index, unlocated = read_png_settings(png)
    given = given_flags(argv)
    if "sampler" in given:  # a sampler named anew brings its own schedule
        given.add("karras")
    missing = [f"{what} (give {flag})" for flag, what in unlocated.items()
               if flag.removeprefix("--").replace("-", "_") not in given]
    if missing:
        raise ValueError(f"--from-png {png}: its A1111 text names {'; '.join(missing)}, not where to find it")
    try:
        saved_argv = settings_argv({k: v for k, v in saved.items() if k not in given})
        build_parser(exit_on_error=False).parse_args(saved_argv)  # each saved value checked as its flag checks it
    except (ValueError, argparse.ArgumentError) as e:
        raise ValueError(f"--from-png {png}: saved {e}") from None
    args = p.parse_args(saved_argv + argv)
    if given & {"num", "seed"}:
        return args, None
    if index is not None and not (isinstance(index, int) and 0 <= index < args.num):
        raise ValueError(f"--from-png {png}: batch position {index!r} is not within its batch of {args.num}")
    return args, index


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, args.index = p.parse_args(argv), None
    if args.from_png:
        args, args.index = with_png_settings(p, argv, args.from_png)
    for flag in ("model", "prompt"):
        if getattr(args, flag) is None:
            p.error(f"--{flag} is required (or --from-png IMG)")
    if args.strength is not None and args.init_image is None:
        p.error("--strength is img2img's: it needs --init-image")
    return args


def settings_of(args: argparse.Namespace, sampler: str, karras: bool, seed: int, height: int, width: int,
                loras: list[tuple[str, float]]) -> dict:
    """What the PNGs keep: the resolved settings, files as absolute paths (see SETTINGS)."""
    def absolute(path):
        return path if path is None or str(path).startswith(RANDOM) else os.path.abspath(path)

    return {"model": absolute(args.model), "prompt": args.prompt, "negative": args.negative,
            "steps": args.steps, "cfg": args.cfg, "rescale": args.rescale, "sampler": sampler, "karras": karras,
            "eta": args.eta, "seed": seed, "height": height, "width": width, "num": args.num,
            "lora": [f"{absolute(path)}:{multiplier}" for path, multiplier in loras], "vae": absolute(args.vae),
            "init_image": absolute(args.init_image),
            "strength": (args.strength or DEFAULT_STRENGTH) if args.init_image else None,
            "original_size": args.original_size, "crop_top_left": args.crop_top_left,
            "target_size": args.target_size, "aesthetic_score": args.aesthetic_score,
            "negative_aesthetic_score": args.negative_aesthetic_score,
            "dtype": cli.chosen_dtype_name(args), "vae_tiling": speed.speed_from_args(args).vae_tiling}


def draw(args: argparse.Namespace, settings: dict, init: torch.Tensor | None, height: int, width: int, sampler: str,
         karras: bool, switches: speed.Speed) -> torch.Tensor:
    """Load the model and its LoRAs, and draw the batch: (num, H, W, 3) uint8."""
    pipe = Pipeline.from_pretrained(args.model, dtype=cli.chosen_dtype(args),
                                    device="cpu" if args.cpu_offload else args.device,
                                    allow_pickle=args.allow_pickle, vae=args.vae, prediction=args.prediction)
    if args.cpu_offload:
        pipe.enable_cpu_offload(args.device)
    print(pipe.model.describe())
    for spec in settings["lora"]:
        path, _, multiplier = spec.rpartition(":")
        name = pipe.add_lora(path, float(multiplier), allow_pickle=args.allow_pickle, removable=False)
        print(f"{path}: {pipe.lora_summaries[name]}")
    speed.prepare_pipeline_model(pipe.model, switches)  # after the LoRAs: a compiled UNet would recompile for each
    return pipe(args.prompt, args.negative, steps=args.steps, guidance_scale=args.cfg, guidance_rescale=args.rescale,
                sampler=sampler, karras=karras, eta=args.eta, height=height, width=width, num_images=args.num,
                init_image=init, strength=settings["strength"] or 1.0, original_size=args.original_size,
                crop_top_left=args.crop_top_left or (0, 0), target_size=args.target_size, clip_skip=args.clip_skip,
                aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
                generator=torch.Generator("cpu").manual_seed(settings["seed"]), progress=True)


@cli.entry("sample.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    speed.apply_threads(args.threads)
    args.device = cli.resolve_device(args.device, "minutes per image at 1024x1024 with full-size SDXL")
    sampler, named_karras = args.sampler
    karras = karras_of(named_karras, args.karras)
    init = None  # before loading gigabytes: every file and setting
    if args.init_image is not None:
        init = load_init_image(args.init_image, args.height, args.width)
    configs = model_configs(args.model, args.allow_pickle)  # from its header: no weight is read yet
    if init is not None:
        height, width = init.shape[2], init.shape[3]
    else:  # the model's own size where none is given, as diffusers
        size = default_size(configs)
        height, width = args.height or size, args.width or size
    settings = settings_of(args, sampler, karras, args.seed if args.seed is not None else random.randrange(2**32),
                           height, width, [parse_lora_spec(spec) for spec in args.lora])
    check_settings(sampler, args.steps, height, width, args.num, strength=settings["strength"] or 1.0, karras=karras)
    if args.vae is not None and not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    check_can_create(args.out, folder=True, what="--out")
    asked = speed.speed_from_args(args)
    if args.plan or args.device.startswith("cuda"):  # before loading gigabytes: will it fit?
        plan = plan_sampling(configs, cli.chosen_dtype(args), height, width, args.num, guidance=args.cfg > 1,
                             vae_slicing=asked.vae_slicing, vae_tiling=asked.vae_tiling, cpu_offload=args.cpu_offload)
        print(plan.describe())
        if args.plan:
            return 0
        check_fits(plan, torch.device(args.device), force=args.force)
    with speed.switched(asked, args.device) as switches:
        hashes = None if args.no_hash else file_hashes(settings, lambda line: print(line, file=sys.stderr))
        images = draw(args, settings, init, height, width, sampler, karras, switches)
    first = args.index or 0
    if args.index is not None:  # --from-png of one image of a batch: the batch redrawn, that image written
        images = images[first:first + 1]
    for path in save_images(images, args.out, str(settings["seed"]), first,
                            pnginfo=lambda i: png_text(settings, i, hashes)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
