"""flash2 Triton kernels against the float64 reference: outputs and every gradient.

On CPU these run under ``TRITON_INTERPRET=1`` (the Makefile sets it); without it and without a
GPU they skip. Every buffer a kernel must write is poisoned with NaN before the launch. The
tolerance rule: at most twice the error of plain PyTorch in the same dtype (``flash2_util``).
"""

from __future__ import annotations

import os

import pytest
import torch
from flash2_util import assert_within_2x

from memlab.ops.attention import attention, attention_reference, decode, decode_reference, kernels_available

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not ((ON_GPU or os.environ.get("TRITON_INTERPRET") == "1") and kernels_available()),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
BF16, F16 = torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from memlab.ops.attention import triton as kernels

    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


# (B, T, S, H, Hkv, D, dtype, options); cu_seqlens in options packs the batch (B = 1, S = T).
CASES = {
    "t1": (1, 1, 1, 2, 2, 64, BF16, dict()),
    "t63-mqa": (1, 63, 63, 4, 1, 64, BF16, dict()),
    "t97-gqa4-d128-fp16": (1, 97, 97, 8, 2, 128, F16, dict()),
    "chunked-prefill-s>t": (2, 33, 97, 4, 1, 64, BF16, dict()),
    "s<t-empty-rows": (1, 63, 40, 2, 1, 64, BF16, dict()),
    "noncausal-s!=t-d128": (1, 63, 97, 2, 2, 128, BF16, dict(causal=False)),
    "t257-window-sinks": (1, 257, 257, 2, 1, 64, BF16, dict(window=50, sinks=4)),
    "window1-gqa4": (1, 97, 97, 4, 1, 64, BF16, dict(window=1)),
    "head-windows-sinks": (1, 97, 97, 4, 2, 64, BF16, dict(head_windows=[-1, 7, 33, -1], sinks=3)),
    "varlen-causal": (1, 161, 161, 4, 2, 64, BF16, dict(cu_seqlens=[0, 1, 64, 64, 97, 161])),
    "varlen-window-sinks": (1, 150, 150, 2, 1, 64, BF16, dict(cu_seqlens=[0, 50, 150], window=20, sinks=2)),
    "varlen-noncausal-d128": (1, 130, 130, 2, 1, 128, F16, dict(cu_seqlens=[0, 33, 130], causal=False)),
}


def _options(opts):
    opts = dict(opts)
    if "cu_seqlens" in opts:
        opts["cu_seqlens"] = torch.tensor(opts["cu_seqlens"], dtype=torch.int32, device=DEVICE)
    return opts


@pytest.mark.parametrize("name", list(CASES))
def test_attention_forward_and_gradients(name) -> None:
    b, t, s, h, hkv, d, dtype, opts = CASES[name]
    opts = _options(opts)
    seed = sum(map(ord, name))
    q = _randn((b, t, h, d), dtype, seed).requires_grad_()
    k = _randn((b, s, hkv, d), dtype, seed + 1).requires_grad_()
    v = _randn((b, s, hkv, d), dtype, seed + 2).requires_grad_()
    do = _randn((b, t, h, d), dtype, seed + 3)
    o = attention(q, k, v, **opts)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = attention_reference(q64, k64, v64, **opts)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    qn, kn, vn = (x.detach().requires_grad_() for x in (q, k, v))
    on = attention_reference(qn, kn, vn, upcast=False, **opts)
    grads_n = torch.autograd.grad(on, (qn, kn, vn), do)

    assert o.dtype == dtype and grads[1].shape == k.shape
    assert_within_2x(f"{name} o", o, o64, on)
    for label, got, ref, naive in zip(("dq", "dk", "dv"), grads, grads64, grads_n, strict=True):
        assert_within_2x(f"{name} {label}", got, ref, naive)
    if t > s and opts.get("causal", True):
        assert (o[:, : t - s] == 0).all() and (grads[0][:, : t - s] == 0).all()


def test_attention_strided_inputs_and_d256_forward() -> None:
    """q, k, v as views of one fused projection (non-contiguous heads), and D=256 forward."""
    qkv = _randn((2, 70, 4 + 2 + 2, 256), BF16, 7)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    with torch.no_grad():
        o = attention(q, k, v)
    o64 = attention_reference(q.double(), k.double(), v.double())
    assert_within_2x("d256", o, o64, attention_reference(q, k, v, upcast=False))


# (B, Tq, H, Hkv, D, Smax, dtype, options, chunk): chunk None is the public default split.
DECODE_CASES = {
    "gqa4-d128-ragged": (3, 1, 8, 2, 128, 97, BF16, dict(), None),
    "gqa4-d128-many-splits": (3, 1, 8, 2, 128, 97, BF16, dict(), 32),
    "mqa-spec4-window-sinks": (2, 4, 4, 1, 64, 130, BF16, dict(window=16, sinks=2), 32),
    "spec8-64rows-fp16": (2, 8, 8, 1, 64, 70, F16, dict(), 64),
    "mqa32-spec3-rowgroups": (1, 3, 32, 1, 64, 40, BF16, dict(), 32),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_ragged(name) -> None:
    from memlab.ops.attention.decode_triton import decode_fwd

    b, tq, h, hkv, d, smax, dtype, opts, chunk = DECODE_CASES[name]
    seed = sum(map(ord, name))
    q = _randn((b, tq, h, d), dtype, seed)
    # Caches stored (B, Hkv, Smax, D) and viewed as (B, Smax, Hkv, D): the kernel reads strides.
    kc = _randn((b, hkv, smax, d), dtype, seed + 1).transpose(1, 2)
    vc = _randn((b, hkv, smax, d), dtype, seed + 2).transpose(1, 2)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, smax + 1, (b, hkv), generator=g, dtype=torch.int32)
    lengths[0, 0], lengths[-1, -1] = smax, min(2, smax)  # a full cache and one shorter than Tq
    lengths = lengths.to(DEVICE)
    if chunk is None:
        o = decode(q, kc, vc, lengths, **opts)
    else:
        o = decode_fwd(q, kc, vc, lengths, scale=d**-0.5, window=opts.get("window"),
                       sinks=opts.get("sinks", 0), chunk=chunk, block_n=32)
    o64 = decode_reference(q.double(), kc.double(), vc.double(), lengths, **opts)
    naive = decode_reference(q, kc, vc, lengths, upcast=False, **opts)
    assert_within_2x(name, o, o64, naive)


def test_decode_matches_attention_prefill_tail() -> None:
    """With every cache full, decoding Tq queries equals causal attention's last Tq rows."""
    b, s, h, hkv, d, tq = 2, 75, 4, 2, 64, 3
    k, v = _randn((b, s, hkv, d), BF16, 11), _randn((b, s, hkv, d), BF16, 12)
    q = _randn((b, tq, h, d), BF16, 13)
    lengths = torch.full((b, hkv), s, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        o_dec = decode(q, k, v, lengths, window=20, sinks=1)
        o_att = attention(q, k, v, window=20, sinks=1)
    torch.testing.assert_close(o_dec.float(), o_att.float(), atol=2e-2, rtol=0)


def test_custom_ops_trace_under_torch_compile() -> None:
    """Fake implementations and autograd registration: fwd + bwd and decode in one compiled graph."""
    q = _randn((1, 40, 4, 64), BF16, 21).requires_grad_()
    k = _randn((1, 40, 2, 64), BF16, 22).requires_grad_()
    v = _randn((1, 40, 2, 64), BF16, 23).requires_grad_()
    lengths = torch.tensor([[40, 17]], dtype=torch.int32, device=DEVICE)

    def step(q, k, v):
        o = attention(q, k, v, window=9, sinks=1)
        dec = decode(q[:, -1:].detach(), k.detach(), v.detach(), lengths, check_lengths=False)
        return o, dec

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o, dec = compiled(q, k, v)
    o.float().square().sum().backward()
    o_ref, dec_ref = step(*(x.detach() for x in (q, k, v)))
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(dec, dec_ref, atol=0, rtol=0)
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))
