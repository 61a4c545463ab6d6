"""Shared helpers of the flash2 tests: error measures and the tolerance rule."""

from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (ref all zero: the plain norm of got)."""
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


def assert_within_2x(name: str, got: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor) -> None:
    """The tolerance rule: the kernel's error against the float64 reference is at most twice the
    error of plain PyTorch in the same dtype (``naive``), both in relative norm and in max abs."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten or NaN element)"
    if not ref64.any():
        # An exactly zero gradient (a query that sees only itself: softmax over one key is exactly
        # 1 in plain PyTorch) cannot be matched to 2x of zero by a kernel that recomputes P from
        # the saved log-sum-exp; ask for zero within the dtype's unit roundoff instead.
        assert max_err(got, ref64) <= torch.finfo(got.dtype).eps, f"{name}: expected zeros"
        return
    err, base = rel_err(got, ref64), rel_err(naive, ref64)
    assert err <= 2 * base + 1e-7, f"{name}: relative error {err:.3e} > 2 x plain PyTorch {base:.3e}"
    err_max, base_max = max_err(got, ref64), max_err(naive, ref64)
    assert err_max <= 2 * base_max + 1e-6, (
        f"{name}: max error {err_max:.3e} > 2 x plain PyTorch {base_max:.3e}"
    )
