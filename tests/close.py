"""What the parity tests share: the assertion that two tensors agree to a tolerance relative to the reference's scale,
and diffusers' images drawn with another scheduler."""

from __future__ import annotations

import torch


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float, min_scale: float = 0.0) -> None:
    """max |got - want| <= tol * max(max |want|, min_scale); shapes must match. `min_scale` keeps the bound meaningful
    for references near zero (images in [0, 1]: 1.0). The message gives the error relative to the scale."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    scale = max(want.float().abs().max().item(), min_scale)
    error = (got.float() - want.float()).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} is {error / max(scale, 1e-30):.3g} of the scale {scale:.3g}"


def reference_images(pipe, scheduler_class, scheduler_args: dict, **kwargs) -> torch.Tensor:
    """A diffusers pipeline's images as float (B, 3, H, W) in [0, 1], with `scheduler_class` made from its scheduler's
    config and `scheduler_args` swapped in for this run."""
    default = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(default.config, **scheduler_args)
    try:
        return pipe(output_type="pt", **kwargs).images
    finally:
        pipe.scheduler = default
