"""The text encoders' names in single-file checkpoints: CLIP ViT-L in transformers' (HF) layout, as SD 1.x and SDXL
store it, and OpenCLIP's (SD 2.x's ViT-H, SDXL's bigG) with q, k and v fused in one `in_proj_weight`; each read into
and written from the diffusers/transformers names minigen's `clip.py` uses."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .checkpoint_keys import ignored_key
from .clip import normalize_clip_keys


# diffusers CLIPTextModel(WithProjection) layer part -> OpenCLIP resblock part (q/k/v are fused, handled apart)
BIGG_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                     "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

BIGG_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}


def hf_clip_to_single_file(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A diffusers/transformers CLIP text model -> `prefix` + the same HF layout (`text_model.encoder.layers...`)."""
    return {prefix + k: v for k, v in normalize_clip_keys(state_dict).items()}


def hf_clip_to_diffusers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`prefix` + HF layout (prefix already removed or not) -> diffusers `text_encoder` keys."""
    return normalize_clip_keys({k.removeprefix(prefix): v for k, v in state_dict.items()
                                if not ignored_key(prefix + k.removeprefix(prefix))})


def openclip_to_single_file(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower in diffusers/transformers names (bigG, ViT-H) -> `prefix` + OpenCLIP names: q/k/v
    fused, the projection (if the model has one) transposed."""
    sd = normalize_clip_keys(state_dict)
    out = {}
    for key, value in sd.items():
        if key in BIGG_TOP:
            out[BIGG_TOP[key]] = value
        elif key == "text_projection.weight":  # Linear (proj, hidden) -> OpenCLIP parameter (hidden, proj)
            out["text_projection"] = value.t().contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, part = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            block = f"transformer.resblocks.{layer}"
            if part.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if part.startswith("self_attn.q_proj."):  # emit the fused tensor once, at q
                    kind = part.rsplit(".", 1)[1]  # weight or bias
                    pre = f"text_model.encoder.layers.{layer}.self_attn."
                    out[f"{block}.attn.in_proj_{kind}"] = torch.cat(
                        [sd[f"{pre}{p}_proj.{kind}"] for p in "qkv"], dim=0)
                continue
            module, kind = part.rsplit(".", 1)
            out[f"{block}.{BIGG_LAYER_PARTS[module]}.{kind}"] = value
        else:
            raise KeyError(f"OpenCLIP text encoder: no single-file name for {key!r}")
    return {prefix + k: v for k, v in out.items()}


def openclip_to_diffusers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`prefix` + OpenCLIP names (prefix already removed or not) -> diffusers/transformers text-encoder keys."""
    top = {v: k for k, v in BIGG_TOP.items()}
    parts = {v: k for k, v in BIGG_LAYER_PARTS.items()}
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix(prefix)
        if ignored_key(prefix + key):
            continue
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            layer, part = key.removeprefix("transformer.resblocks.").split(".", 1)
            pre = f"text_model.encoder.layers.{layer}."
            if part.startswith("attn.in_proj_"):
                kind = part.removeprefix("attn.in_proj_")
                for p, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{pre}self_attn.{p}_proj.{kind}"] = chunk.contiguous()
            else:
                module, kind = part.rsplit(".", 1)
                if module not in parts:
                    raise KeyError(f"OpenCLIP text encoder: unknown single-file key {prefix + key!r}")
                out[pre + parts[module] + "." + kind] = value
        else:
            raise KeyError(f"OpenCLIP text encoder: unknown single-file key {prefix + key!r}")
    return out


def text_converters(prefix: str) -> tuple[Callable, Callable]:
    """(to single file, to diffusers) of the text encoder stored under `prefix`: HF layout or OpenCLIP's."""
    if prefix.endswith(".transformer."):
        return hf_clip_to_single_file, hf_clip_to_diffusers
    return openclip_to_single_file, openclip_to_diffusers
