"""The layers the SDXL UNet and VAE share: attention, the residual block, down- and upsampling.

Module and parameter names are diffusers' (`to_q`, `to_out.0`, `norm1`, `conv_shortcut`, ...), so diffusers
state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`; self-attention when no context is given."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # a list, so the name is diffusers' `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, L, _ = x.shape

        def split_heads(t):  # (B, L, heads * hd) -> (B, heads, L, hd)
            return t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, hd)
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, -1))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (UNet only) and a 1x1 shortcut when the
    channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv. The VAE pads only right and bottom (padding=0 here), as the original LDM code did."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`, when the skip connection it meets has an odd size), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
