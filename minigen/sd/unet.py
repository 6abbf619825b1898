"""The Stable Diffusion UNet (SD 1.x, 2.x, SDXL and its slimmed variants): diffusers' UNet2DConditionModel as
these models configure it, in one readable file.

    sample (B, 4, h, w) --conv_in--> down_blocks (resnets + cross-attention transformers, skips saved)
      --> mid_block --> up_blocks (skips concatenated back) --> norm, SiLU, conv_out --> noise prediction (B, 4, h, w)

Every block also receives one embedding (B, 4 * channels[0]): the timestep's, plus in SDXL the "text_time" added
conditioning - the pooled bigG text embedding and six size/crop numbers (original h, w, crop top, left, target h, w;
the refiner has five: an aesthetic score instead of the target size). What differs between the families is config:

    SD 1.x   4 levels, 8 heads everywhere, context 768 (CLIP ViT-L), 1x1-conv projections into the transformers
    SD 2.x   4 levels, 64-dim heads, context 1024 (OpenCLIP ViT-H), linear projections
    SDXL     3 levels, transformer depth 1/2/10 (SSD-1B and Vega: fewer), context 2048, added conditioning

Module names are diffusers', so a diffusers `unet/` folder loads as it is and LoRA targets are `to_q`, `to_k`,
`to_v`, `to_out.0`; `convert.unet_name_map` gives the single-file (SGM/LDM) names, `detect.py` reads a config from
a file's tensor shapes.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosines first (diffusers' flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """Linear to twice the width; one half gates the other through GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # net.1: dropout slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection of the pixels to tokens, `depth` transformer blocks, back to pixels; residual.

    The projections are linear layers on the tokens (SD 2.x, SDXL) or 1x1 convolutions on the image before it is
    flattened (SD 1.x: `linear=False`); the same map, stored with different shapes, (C, C) or (C, C, 1, 1).
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.linear = linear
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)  # (B, C, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = _run(block, self.gradient_checkpointing, h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return (h if self.linear else self.proj_out(h)) + x


def _run(module: nn.Module, use_checkpoint: bool, *args):
    """Call `module`, recomputing its activations in the backward pass instead of storing them when asked."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class UNetBlock(nn.Module):
    """A level of the down or up path: (resnet, optional transformer) pairs, then an optional resampler.

    depths[j]: the transformer depth after resnet j (0: none). On the way up each resnet first concatenates the skip
    connection saved by the matching down-path layer.
    """

    def __init__(self, in_channels: list[int], out_channels: int, temb: int, heads: int, depths: list[int],
                 context_dim: int, groups: int, eps: float, linear: bool, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_channels, temb, groups, eps) for c in in_channels])
        if any(depths):
            self.attentions = nn.ModuleList([Transformer2DModel(out_channels, heads, d, context_dim, groups, linear)
                                             for d in depths])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=1)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context, skips: list | None = None, upsample_size=None):
        """Down path (skips None): returns (x, outputs to save). Up path: pops from `skips`, returns x."""
        saved = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = _run(resnet, self.gradient_checkpointing, x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            saved.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            saved.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x if skips is not None else (x, saved)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, transformer, resnet; with depth 0 only the first resnet (diffusers' "UNetMidBlock2D" as SSD-1B and
    Vega configure it: no attention)."""

    def __init__(self, channels: int, temb: int, heads: int, depth: int, context_dim: int, groups: int, eps: float,
                 linear: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb, groups, eps)
                                      for _ in range(2 if depth else 1)])
        if depth:
            self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, depth, context_dim, groups, linear)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context):
        x = _run(self.resnets[0], self.gradient_checkpointing, x, temb)
        if len(self.resnets) == 1:
            return x
        x = self.attentions[0](x, context)
        return _run(self.resnets[1], self.gradient_checkpointing, x, temb)


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


# Options of diffusers' UNet2DConditionModel this UNet implements only with Stable Diffusion's value.
_SD_ONLY = {"class_embed_type": None, "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "only_cross_attention": False,
            "dual_cross_attention": False, "encoder_hid_dim": None}
ADDED_EMBEDDINGS = (None, "text_time")  # SD 1.x/2.x, SDXL
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def unet_depths(config: Mapping) -> tuple[list[int], list[list[int]], int]:
    """Transformer depths: per down level, per up level and layer, and the mid block's (0: no attention there).

    A level of a block type without cross-attention has depth 0. Up levels mirror the down levels unless the config
    lists them (`reverse_transformer_layers_per_block`, as SSD-1B and Vega, which drop blocks unevenly, do).
    """
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    down = _per_level(config.get("transformer_layers_per_block") or 1, levels)
    down = [d if kind.startswith("CrossAttn") else 0 for d, kind in zip(down, config["down_block_types"])]
    reverse = config.get("reverse_transformer_layers_per_block")
    up = [list(r) for r in reverse] if reverse else [[down[levels - 1 - i]] * (layers + 1) for i in range(levels)]
    up = [u if kind.startswith("CrossAttn") else [0] * (layers + 1) for u, kind in zip(up, config["up_block_types"])]
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = _per_level(config.get("transformer_layers_per_block") or 1, levels)[-1] \
        if mid_type == "UNetMidBlock2DCrossAttn" else 0
    return down, up, mid


class UNet2DConditionModel(nn.Module):
    """The Stable Diffusion UNet. `config` is a diffusers `unet/config.json` dict (see `configs.py`)."""

    def __init__(self, config: Mapping):
        super().__init__()
        for key, value in _SD_ONLY.items():
            if config.get(key, value) != value:
                raise ValueError(f"UNet config: {key}={config[key]!r} is not supported (Stable Diffusion uses {value!r})")
        if config.get("addition_embed_type") not in ADDED_EMBEDDINGS:
            raise ValueError(f"UNet config: addition_embed_type={config['addition_embed_type']!r} is not supported")
        if config.get("mid_block_type", MID_BLOCKS[0]) not in MID_BLOCKS:
            raise ValueError(f"UNet config: mid_block_type={config['mid_block_type']!r} is not supported")
        self.config = dict(config)
        channels = list(config["block_out_channels"])
        levels, layers = len(channels), config["layers_per_block"]
        # diffusers' `attention_head_dim` is the number of heads when `num_attention_heads` is unset (a known misnomer)
        heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels)
        down_depths, up_depths, mid_depth = unet_depths(config)
        context, groups, eps = config["cross_attention_dim"], config["norm_num_groups"], config["norm_eps"]
        linear = config.get("use_linear_projection", False)
        # upcast_attention (SD 2.1): diffusers computes attention scores in fp32 only in its pre-SDPA processor; its
        # default processor, like F.scaled_dot_product_attention here, keeps the input dtype. Nothing to do.
        temb = channels[0] * 4
        self.time_dim = channels[0]

        self.conv_in = nn.Conv2d(config["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        if config.get("addition_embed_type") == "text_time":
            self.add_time_dim = config["addition_time_embed_dim"]
            self.add_embedding = TimestepEmbedding(config["projection_class_embeddings_input_dim"], temb)

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            c_in = channels[max(i - 1, 0)]
            self.down_blocks.append(UNetBlock(
                [c_in] + [channels[i]] * (layers - 1), channels[i], temb, heads[i], [down_depths[i]] * layers,
                context, groups, eps, linear, resample="down" if i < levels - 1 else None))
        self.mid_block = None if config.get("mid_block_type", MID_BLOCKS[0]) is None else \
            UNetMidBlock2DCrossAttn(channels[-1], temb, heads[-1], mid_depth, context, groups, eps, linear)

        # Up level i mirrors down level (levels-1-i); its resnets take the previous output plus one skip each:
        # `layers` skips of this level's width, and last the one saved before this level (the lower width).
        self.up_blocks = nn.ModuleList()
        for i in range(levels):
            level = levels - 1 - i
            out, previous, lower = channels[level], channels[min(level + 1, levels - 1)], channels[max(level - 1, 0)]
            in_channels = [(previous if j == 0 else out) + (lower if j == layers else out) for j in range(layers + 1)]
            self.up_blocks.append(UNetBlock(
                in_channels, out, temb, heads[level], up_depths[i], context, groups, eps, linear,
                resample="up" if i < levels - 1 else None))

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], config["out_channels"], 3, padding=1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each resnet and transformer block's activations in the backward pass (less memory, ~30% slower)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, 4, h, w), timestep () or (B,), encoder_hidden_states (B, 77, context) -> predicted noise (or
        v) (B, 4, h, w). SDXL also takes text_embeds (B, 1280) and time_ids (B, 6) (the refiner's (B, 5))."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        emb = self.time_embedding(timestep_embedding(t, self.time_dim).to(sample.dtype))  # (B, temb)
        if hasattr(self, "add_embedding"):
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL) needs text_embeds and time_ids")
            time_embeds = timestep_embedding(time_ids.reshape(-1), self.add_time_dim).reshape(B, -1)  # (B, 6 * 256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, saved = block(x, emb, encoder_hidden_states)
            skips += saved
        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states)
        for block in self.up_blocks:
            # upsample to the size of the skip waiting below this level (odd sizes do not double exactly)
            below = skips[-len(block.resnets) - 1].shape[-2:] if len(skips) > len(block.resnets) else None
            x = block(x, emb, encoder_hidden_states, skips, below)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
