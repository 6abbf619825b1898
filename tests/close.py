"""The parity assertion the tests share: two tensors agree to a tolerance relative to the reference's scale."""

from __future__ import annotations

import torch


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float, min_scale: float = 0.0) -> None:
    """max |got - want| <= tol * max(max |want|, min_scale); shapes must match. `min_scale` keeps the bound meaningful
    for references near zero (images in [0, 1]: 1.0). The message gives the error relative to the scale."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    scale = max(want.float().abs().max().item(), min_scale)
    error = (got.float() - want.float()).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} is {error / max(scale, 1e-30):.3g} of the scale {scale:.3g}"
