"""Mamba through the fused Triton scan (memlab.ops.scan) equals Mamba through its chunked PyTorch scan."""

from __future__ import annotations

import pytest
import torch

from memlab import mixers
from memlab.ops import scan as fused_scan

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or fused_scan.interpreting()),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    opts = {"d_model": 16, "d_state": 4, "expand": 1, "chunk_size": 8}
    torch.manual_seed(seed)
    ref = mixers.build("mamba", scan="torch", **opts)
    fused = mixers.build("mamba", scan="triton", **opts)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_outputs_gradients_and_state_match_the_chunked_scan() -> None:
    ref, fused = pair()
    x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(1))
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, sr = ref(xr)
    yf, sf = fused(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sf["ssm"], sr["ssm"], rtol=1e-4, atol=1e-5)
    g = torch.randn_like(yr)
    (yr * g).sum().backward()
    (yf * g).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_two_calls_with_state_equal_one_call() -> None:
    _, fused = pair(2)
    x = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, _ = fused(x)
        first, st = fused(x[:, :13])
        second, _ = fused(x[:, 13:], state=st)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-4, atol=1e-5)


def test_bad_scan_option_is_named() -> None:
    with pytest.raises(ValueError, match="scan"):
        mixers.build("mamba", d_model=16, scan="cuda")
