"""Judge LoRAs as seeds 000, 001 and 003 did: the same prompts from the same noise with the base model and each LoRA,
then FID, KID and IS against a reference image folder, and PSNR/SSIM of each LoRA image against the base image of the
same prompt and seed (how far the LoRA moves the picture).

    report = evaluate("sd_xl_base_1.0.safetensors", ["style.safetensors", "runs/lora/"], "prompts.txt", "met",
                      out="outputs/eval", num_images=2, settings=Settings(steps=30, guidance_scale=5.0))

Built only from the pieces: `Pipeline` generates (image i of a prompt comes from `torch.Generator("cpu")
.manual_seed(seed + i)`, so the base images equal `sample.py --seed seed+i --num 1`), `minigen.fid.metrics` measures.
Prompts are encoded once with the base text encoders and reused for every LoRA that leaves them alone (a LoRA with
text-encoder layers re-encodes with its own); each batch holds several prompts.

A training run's folder stands for its checkpoints: every LoRA file in it (told by content: the trainer's own
checkpoint.safetensors beside them is skipped), ordered by epoch. A LoRA's epoch, in a folder or given alone, is read
from kohya's `ss_epoch` metadata or else from the file name (`name-000003.safetensors`, `...epoch3...`).

Writes into `out`: images/<model>/<prompt number>-<seed>.png (each with its settings, as sample.py's: `sample.py
--from-png` redraws it), results.md and results.json (one row per model),
grid-seed<seed>.png (rows: prompts, columns: models), and fid_per_epoch.png when epochs are known.

Under torchrun (minigen.distributed) the ranks measure the reference in shares and take turns of --batch-size images
each: rank 0 gathers every image and its features, writes and scores, so the report equals one process's.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import distributed
from ..fid import metrics
from ..fid.features import extract_features
from ..fid import inception as fid_inception
from ..images import list_images, open_rgb
from ..atomic import atomic_write, check_can_create
from ..finetune.memory_plan import model_configs
from ..sd.lora_reading import read_lora, resolve_lora
from .report import image_path, markdown_table, plot_fid_per_epoch, save_grids, write_json
from ..plot import save_png
from ..sd.png_info import png_text
from ..sd.configs import default_size
from ..sd.convert import unet_name_map
from ..sd.detect import family_of_configs
from ..sd.model import RANDOM
from ..sd.pipeline import Pipeline
from ..speed import Speed, prepare_pipeline_model
from .inputs import (KID_SUBSET, Candidate, Settings, candidates, check_counts, check_numbers, existing_folder,
                     lora_family_problem, read_prompts)

FID_DIMS = 2048  # the pool3 features every published FID uses; 64/192/768 are pytorch-fid's --dims options


def lora_touches_text(pipe: Pipeline, lora: Path) -> bool:
    """Check that the file's layers fit this model's (a clear LoRAFileError naming it if not; its family was checked
    before the model loaded, `lora_family_problem`), before anything is generated; True when it has text-encoder
    layers (its prompts must then be encoded with its own encoders)."""
    parsed, _, _ = read_lora(lora)
    models = pipe.model.lora_components()
    resolve_lora(parsed, models, unet_name_map(pipe.model.unet.config), source=str(lora))
    return any(component != "unet" for component in parsed)


# ------------------------------------------------------------------------------------------------- generation

def encode_prompts(pipe: Pipeline, prompts: Sequence[str], settings: Settings) -> list[tuple]:
    """Each prompt's (context, pooled) as the pipeline lays them out for one image: ([negative,] positive)."""
    guidance = settings.guidance_scale > 1
    return [pipe.conditioning(p, settings.negative_prompt, 1, guidance) for p in prompts]


def generate_batch(pipe: Pipeline, embeddings: list[tuple], seeds: Sequence[int],
                   settings: Settings) -> torch.Tensor:
    """One image per (embedding, seed), all in one batch: (B, H, W, 3) uint8."""
    rows = embeddings[0][0].shape[0]  # 2 with guidance: negatives of all prompts first, then positives
    context = torch.cat([e[0][g: g + 1] for g in range(rows) for e in embeddings])  # (rows * B, 77, D)
    pooled = None if embeddings[0][1] is None else \
        torch.cat([e[1][g: g + 1] for g in range(rows) for e in embeddings])  # (rows * B, 1280); SD 1/2: none
    kwargs = {k: v for k, v in asdict(settings).items() if k != "negative_prompt"}
    return pipe(None, num_images=len(seeds), generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                embeddings=(context, pooled), **kwargs)


def png_settings(model: str | os.PathLike | Pipeline, row: Candidate, prompt: str, seed: int,
                 settings: Settings) -> dict:
    """What an evaluation image keeps in its PNG, as sample.py's images do (minigen/sd/png_info.py): the image is
    `sample.py --seed SEED --num 1` of its prompt, so `sample.py --from-png` redraws it (up to the rounding of a
    batch of several prompts against one)."""
    return {"model": "(in memory)" if isinstance(model, Pipeline) else
            (str(model) if str(model).startswith(RANDOM) else os.path.abspath(model)),
            "prompt": prompt, "negative": settings.negative_prompt, "steps": settings.steps,
            "cfg": settings.guidance_scale, "sampler": settings.sampler, "karras": settings.karras, "seed": seed,
            "height": settings.height, "width": settings.width, "num": 1,
            "lora": [f"{os.path.abspath(row.lora)}:{row.multiplier}"] if row.lora is not None else []}


# ---------------------------------------------------------------------------------------------------- metrics

def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """metrics.statistics, without its few-images warning: check_counts gave it once, with the number needed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*give a singular")
        return metrics.statistics(features)


def score_features(reference: np.ndarray, reference_stats: tuple, features: dict[str, np.ndarray], dims: int,
                   is_splits: int) -> dict:
    """FID, KID (and IS when the features carry logits and there are enough images) of one model's images."""
    generated = features[str(dims)]
    result = {"fid": metrics.frechet_distance(*reference_stats, *gaussian_statistics(generated))}
    subset = min(KID_SUBSET, len(reference), len(generated))
    result["kid"], result["kid_std"] = metrics.kid(reference, generated, subset_size=subset)
    if "logits_unbiased" in features and len(generated) >= is_splits:
        result["is"], result["is_std"] = metrics.inception_score(features["logits_unbiased"], splits=is_splits)
    return result


def paired_scores(out: Path, model: str, items: Sequence[tuple[int, int]]) -> dict:
    """Mean PSNR and SSIM of a model's images against the base images of the same prompt and seed."""
    psnrs, ssims = [], []
    for p, s in items:
        image, base = (np.asarray(open_rgb(image_path(out, m, p, s))) for m in (model, "base"))
        psnrs.append(metrics.psnr(image, base))
        ssims.append(metrics.ssim(image, base))
    return {"psnr_vs_base": float(np.mean(psnrs)), "ssim_vs_base": float(np.mean(ssims))}


# ---------------------------------------------------------------------------------------------------- the job

def evaluate(model: str | os.PathLike | Pipeline, loras: Sequence[str], prompts: str | os.PathLike,
             reference: str | os.PathLike, out: str | os.PathLike = "outputs/eval", *, num_images: int = 1,
             seed: int = 0, settings: Settings | None = None, batch_size: int = 4, max_prompts: int | None = None,
             grid_prompts: int = 8, inception_weights: str | os.PathLike | None = None, dims: int = FID_DIMS,
             is_splits: int = 10,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
             speed: Speed = Speed(), allow_pickle: bool = False) -> dict:
    """The whole judgement (see the module docstring); returns the report written to results.json.
    speed: --channels-last, --vae-slicing (minigen/speed.py); not --compile, which each LoRA would undo.
    allow_pickle: accept a pickled model checkpoint (loaded with weights_only=True).

    Everything that can be wrong is checked before the first image: settings, prompts, the reference folder and its
    size, each LoRA against the model, the Inception weights.
    """
    settings = settings or Settings()
    check_numbers(settings, num_images, batch_size, max_prompts, grid_prompts, dims, is_splits)
    prompt_list = read_prompts(prompts, max_prompts)
    reference = existing_folder(reference, "reference")
    n_reference = len(list_images(reference))
    rows = candidates(loras)
    out = Path(out)
    check_can_create(out / "results.json")  # out is a folder, or can be made one
    # the model's configs from its header only: a missing, foreign or unrecognised model fails now, not after the
    # Inception and the reference images; they give the image size where none is set
    configs = model.model.configs if isinstance(model, Pipeline) else model_configs(str(model), allow_pickle)
    size = default_size(configs)
    settings = replace(settings, height=settings.height or size, width=settings.width or size)
    seeds = [seed + i for i in range(num_images)]
    items = [(p, s) for p in range(len(prompt_list)) for s in seeds]  # each image: (prompt index, seed)
    # the LoRAs' families and the image counts: what is wrong with any of them, said in one go
    family = family_of_configs(configs)
    problems = [problem for row in rows if row.lora is not None if (problem := lora_family_problem(row.lora, family))]
    try:
        check_counts(reference, n_reference, len(items), dims)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    # small: its errors come before the model load
    net = fid_inception.load_inception(inception_weights, device, flag="--inception-weights")
    if net.has_classifier and len(items) < is_splits:
        warnings.warn(f"no Inception Score: it needs at least {is_splits} images per model ({is_splits} splits), "
                      f"got {len(items)}", stacklevel=2)
    pipe = model if isinstance(model, Pipeline) else \
        Pipeline.from_pretrained(model, dtype, device, allow_pickle=allow_pickle)
    prepare_pipeline_model(pipe.model, speed)
    touches_text = {row.name: row.lora is not None and lora_touches_text(pipe, row.lora) for row in rows}
    outputs = (str(dims), "logits_unbiased") if net.has_classifier else (str(dims),)

    main, per_turn = distributed.is_main(), batch_size * distributed.world_size()
    bar = tqdm(total=n_reference + len(rows) * len(items), unit="img", desc="eval", disable=not (progress and main))
    reference_features = extract_features(net, reference, (str(dims),), progress=False,
                                                  split_across_ranks=True)
    reference_stats = gaussian_statistics(reference_features[str(dims)])
    bar.update(n_reference)
    base_embeddings = encode_prompts(pipe, prompt_list, settings)
    report_rows = []
    for row in rows:
        bar.set_postfix_str(row.name)
        if row.lora is not None:
            pipe.add_lora(row.lora, row.multiplier)
        embeddings = encode_prompts(pipe, prompt_list, settings) if touches_text[row.name] else base_embeddings
        features: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, len(items), per_turn):  # each rank a batch of its own, then all gathered in order
            _, batch = distributed.my_part(items[start: start + per_turn], batch_size)
            made = None
            if batch:
                images = generate_batch(pipe, [embeddings[p] for p, _ in batch], [s for _, s in batch],
                                        settings).numpy()
                measured = extract_features(net, list(images), outputs, progress=False)
                made = (batch, images, {name: measured[name] for name in outputs})
            for part in distributed.gather_objects(made, f"the other ranks' images of {row.name}"):
                if part is None:  # a rank left without a batch in the last turn
                    continue
                batch_items, images, measured = part
                if main:
                    for (p, s), image in zip(batch_items, images):
                        save_png(Image.fromarray(image), image_path(out, row.name, p, s),
                                 png_text(png_settings(model, row, prompt_list[p], s, settings), 0))
                for name in outputs:
                    features[name].append(measured[name])
                bar.update(len(batch_items))
        if row.lora is not None:
            pipe.remove_lora(f"lora{pipe.loras}")
        if not main:  # rank 0 scores (it holds the images) and shares the report at the end
            continue
        result = {"model": row.name, "lora": str(row.lora) if row.lora else None, "multiplier": row.multiplier,
                  "epoch": row.epoch, "images": len(items), "text_encoder_lora": touches_text[row.name]}
        result.update(score_features(reference_features[str(dims)], reference_stats,
                                     {k: np.concatenate(v) for k, v in features.items()}, dims, is_splits))
        if row.lora is not None:
            result.update(paired_scores(out, row.name, items))
        report_rows.append({k: finite_or_none(v) if isinstance(v, float) else v for k, v in result.items()})
    bar.close()
    if not main:
        return distributed.broadcast_object(None, "rank 0 to score the images and write the report")
    grids = save_grids(out, [r.name for r in rows], prompt_list[:grid_prompts], seeds)
    plotted = plot_fid_per_epoch(report_rows, out / "fid_per_epoch.png")
    report = {"prompts": prompt_list, "seeds": seeds, "reference": {"folder": str(reference), "images": len(reference_features),
                                                         "skipped": len(reference_features.skipped)},
              "settings": asdict(settings), "dims": dims, "is_splits": is_splits,
              "rows": report_rows, "grids": [str(g) for g in grids],
              "fid_per_epoch": str(out / "fid_per_epoch.png") if plotted else None}
    write_json(out / "results.json", report)
    with atomic_write(out / "results.md", mode="w") as f:
        f.write(markdown_table(report_rows) + "\nPrompts (the grids' rows), seeds " + ", ".join(map(str, seeds))
                + ":\n\n" + "".join(f"{i + 1}. {p}\n" for i, p in enumerate(prompt_list)))
    return distributed.broadcast_object(report, "rank 0 to score the images and write the report")
