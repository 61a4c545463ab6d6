"""Kernels against their references at awkward shapes, and clear errors for bad inputs.

Covers what the other ops tests leave out: lengths that are not multiples of the tile sizes
(1, 2, 17, 63, 65, 129), Tq != Tk (chunked prefill, S < T), batch 1 and 3, every head dim in
``HEAD_DIMS``, GQA ratios 1 to 4, windows and sinks at their edges, ragged decode lengths
(0, 1, full) with several split counts, non-contiguous views, non-default scales, and the
selective scan at odd lengths and state sizes with chunked state passing.

Tolerances: attention and decode follow the rule of ``flash2_util.assert_within_2x`` (the kernel's
error against the float64 reference at most twice that of plain PyTorch in the same 16-bit dtype,
relative norm and max abs). The float32 scan must match the float64 reference to a relative
error of 1e-5 (outputs, states) and 2e-5 (gradients). Every buffer a kernel must write is
poisoned with NaN first. Kernel tests run under ``TRITON_INTERPRET=1`` on CPU (or on a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from flash2_util import assert_within_2x
from test_scan import _run as scan_run  # output, state and gradients of one scan call

from memlab.ops import attention as attn_ops
from memlab.ops import scan as scan_ops
from memlab.ops.attention import attention, attention_reference, decode, decode_reference
from memlab.ops.scan import selective_scan, selective_scan_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_attn_kernels = pytest.mark.skipif(
    not ((ON_GPU or INTERP) and attn_ops.kernels_available()),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
needs_scan_kernels = pytest.mark.skipif(
    not ((ON_GPU or INTERP) and scan_ops.kernels_available()),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    if INTERP or ON_GPU:
        if attn_ops.kernels_available():
            from memlab.ops.attention import triton as attn_kernels

            monkeypatch.setattr(attn_kernels, "POISON_OUTPUTS", True)
        if scan_ops.kernels_available():
            from memlab.ops.scan import triton as scan_kernels

            monkeypatch.setattr(scan_kernels, "POISON_OUTPUTS", True)


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _seed(name: str) -> int:
    return sum(map(ord, name)) * 31 + len(name)


# ----------------------------------------------------------------------------------------------
# attention: forward and gradients against float64

# (B, T, S, H, Hkv, D, dtype, options); options may hold cu_seqlens (B = 1, S = T).
ATTN_CASES = {
    "t1-d16": (1, 1, 1, 1, 1, 16, BF16, dict()),
    "t2-gqa2-d32": (3, 2, 2, 2, 1, 32, F16, dict()),
    "t17-gqa3-b3": (3, 17, 17, 3, 1, 16, BF16, dict()),
    "t65-gqa4-d32": (1, 65, 65, 4, 1, 32, BF16, dict()),
    "t129-d16": (1, 129, 129, 2, 2, 16, F16, dict()),
    "prefill-t17-s129-gqa2": (1, 17, 129, 4, 2, 32, BF16, dict()),
    "prefill-t1-s65": (2, 1, 65, 3, 1, 64, BF16, dict()),
    "s<t-t65-s17": (1, 65, 17, 2, 1, 16, BF16, dict()),
    "noncausal-t17-s63-gqa3": (1, 17, 63, 6, 2, 16, F16, dict(causal=False)),
    "noncausal-t65-s2": (3, 65, 2, 2, 2, 16, BF16, dict(causal=False)),
    "window1": (1, 63, 63, 2, 1, 16, BF16, dict(window=1)),
    "window1-sinks1": (1, 65, 65, 2, 2, 16, BF16, dict(window=1, sinks=1)),
    "window>=len": (1, 63, 63, 2, 1, 16, BF16, dict(window=63, sinks=0)),
    "window>>len-sinks": (1, 65, 65, 2, 1, 16, BF16, dict(window=1000, sinks=3)),
    "sinks>window": (1, 65, 65, 2, 1, 32, BF16, dict(window=3, sinks=40)),
    "sinks>=len": (1, 17, 17, 2, 1, 16, BF16, dict(window=2, sinks=100)),
    "window-prefill-t17-s129": (2, 17, 129, 4, 1, 16, BF16, dict(window=40, sinks=2)),
    "window-s<t": (1, 63, 40, 2, 1, 16, BF16, dict(window=5, sinks=1)),
    "head-windows-gqa3": (1, 65, 65, 6, 2, 16, BF16, dict(head_windows=[1, -1, 64, 3, 1000, 33], sinks=2)),
    "head-windows-prefill": (1, 17, 65, 4, 4, 16, F16, dict(head_windows=[1, 20, -1, 5])),
    "scale-0.3": (1, 65, 65, 2, 1, 32, BF16, dict(scale=0.3)),
    "scale-2": (1, 17, 33, 2, 1, 16, F16, dict(scale=2.0, causal=False)),
    "varlen-1-0-63": (1, 64, 64, 2, 1, 16, BF16, dict(cu_seqlens=[0, 1, 1, 64])),
    "varlen-window1": (1, 66, 66, 3, 3, 16, BF16, dict(cu_seqlens=[0, 2, 19, 66], window=1)),
    "varlen-head-windows": (1, 50, 50, 2, 1, 16, F16, dict(cu_seqlens=[0, 33, 50], head_windows=[4, -1])),
}


def _options(opts):
    opts = dict(opts)
    if "cu_seqlens" in opts:
        opts["cu_seqlens"] = torch.tensor(opts["cu_seqlens"], dtype=torch.int32, device=DEVICE)
    return opts


def _check_attention(name, q, k, v, do, opts):
    """Kernel output and gradients of (q, k, v) against float64 and plain-dtype references."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = attention(q, k, v, **opts)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = attention_reference(q64, k64, v64, **opts)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    qn, kn, vn = (x.detach().requires_grad_() for x in (q, k, v))
    on = attention_reference(qn, kn, vn, upcast=False, **opts)
    grads_n = torch.autograd.grad(on, (qn, kn, vn), do)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_within_2x(f"{name} o", o, o64, on)
    for label, got, ref, naive in zip(("dq", "dk", "dv"), grads, grads64, grads_n, strict=True):
        assert got.shape == ref.shape and got.dtype == q.dtype
        assert_within_2x(f"{name} {label}", got, ref, naive)
    return o, grads


@needs_attn_kernels
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_awkward_shapes(name) -> None:
    b, t, s, h, hkv, d, dtype, opts = ATTN_CASES[name]
    opts = _options(opts)
    seed = _seed(name)
    q, k, v = _randn((b, t, h, d), dtype, seed), _randn((b, s, hkv, d), dtype, seed + 1), \
        _randn((b, s, hkv, d), dtype, seed + 2)
    do = _randn((b, t, h, d), dtype, seed + 3)
    o, grads = _check_attention(name, q, k, v, do, opts)
    if t > s and opts.get("causal", True) and "cu_seqlens" not in opts:
        # Queries before the first key see nothing: exact zeros, and no gradient.
        assert (o[:, : t - s] == 0).all() and (grads[0][:, : t - s] == 0).all()


@needs_attn_kernels
@pytest.mark.parametrize("d", attn_ops.HEAD_DIMS)
def test_attention_every_head_dim(d) -> None:
    """Every supported head dim, with gradients where a backward kernel exists."""
    b, t, s, h, hkv = 1, 17, 33, 2, 1
    seed = 100 + d
    q, k, v = _randn((b, t, h, d), BF16, seed), _randn((b, s, hkv, d), BF16, seed + 1), \
        _randn((b, s, hkv, d), BF16, seed + 2)
    if d in attn_ops.BACKWARD_HEAD_DIMS:
        _check_attention(f"d{d}", q, k, v, _randn((b, t, h, d), BF16, seed + 3), dict(window=9, sinks=1))
    else:
        with torch.no_grad():
            o = attention(q, k, v, window=9, sinks=1)
        o64 = attention_reference(q.double(), k.double(), v.double(), window=9, sinks=1)
        assert_within_2x(f"d{d} o", o, o64, attention_reference(q, k, v, upcast=False, window=9, sinks=1))


@needs_attn_kernels
def test_attention_non_contiguous_views() -> None:
    """q, k, v stored (B, H, T, D) and viewed (B, T, H, D); k, v with a non-unit last stride
    (stored (B, S, D, Hkv)); a non-contiguous upstream gradient."""
    b, t, s, h, hkv, d = 3, 33, 65, 4, 2, 32
    seed = 77
    q = _randn((b, h, t, d), BF16, seed).transpose(1, 2)
    k = _randn((b, hkv, s, d), BF16, seed + 1).transpose(1, 2)
    v = _randn((b, s, d, hkv), BF16, seed + 2).transpose(2, 3)
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) != 1
    do = _randn((b, h, t, d), BF16, seed + 3).transpose(1, 2)
    _check_attention("views", q, k, v, do, dict(window=20, sinks=2, scale=0.2))


@needs_attn_kernels
def test_attention_chunked_prefill_equals_full_prefill() -> None:
    """Causal attention of the last 17 queries over all 65 keys equals the last rows of the full one."""
    b, s, h, hkv, d, tail = 1, 65, 4, 2, 16, 17
    q, k, v = _randn((b, s, h, d), BF16, 5), _randn((b, s, hkv, d), BF16, 6), _randn((b, s, hkv, d), BF16, 7)
    with torch.no_grad():
        full = attention(q, k, v, window=9, sinks=2)
        part = attention(q[:, -tail:], k, v, window=9, sinks=2)
    torch.testing.assert_close(part.float(), full[:, -tail:].float(), atol=1e-2, rtol=0)


@needs_attn_kernels
def test_huge_windows_mean_no_window() -> None:
    """Windows near or above 2**31 ("no limit") equal full causal attention: the kernels add the
    window to int32 positions, and a head_windows entry of 2**40 used to fail the int32 table."""
    b, t, h, hkv, d = 1, 40, 2, 1, 16
    q = _randn((b, t, h, d), BF16, 91)
    k, v = _randn((b, t, hkv, d), BF16, 92), _randn((b, t, hkv, d), BF16, 93)
    do = _randn((b, t, h, d), BF16, 94)
    full, full_grads = _check_attention("full", q, k, v, do, {})
    huge = (dict(window=2**31 - 1), dict(window=2**31 - 1, sinks=2**31 - 1), dict(head_windows=[2**40, -1]))
    for opts in huge:
        o, grads = _check_attention(str(opts), q, k, v, do, opts)
        torch.testing.assert_close(o, full, atol=0, rtol=0)
        for got, ref in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(got, ref, atol=0, rtol=0)
    lengths = torch.tensor([[t]], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        plain = decode(q[:, -2:], k, v, lengths)
        wide = decode(q[:, -2:], k, v, lengths, window=2**31 - 1)
    torch.testing.assert_close(wide, plain, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# decode against float64


# (B, Tq, H, Hkv, D, Smax, dtype, options, lengths or None (random), chunk (None: public default))
DECODE_CASES = {
    "len-0-1-full": (2, 1, 4, 2, 16, 65, BF16, dict(), [[0, 1], [65, 17]], None),
    "gqa3-chunk32": (1, 1, 6, 2, 32, 129, BF16, dict(), [[129, 63]], 32),
    "gqa1-one-split": (3, 1, 2, 2, 16, 63, F16, dict(), None, 64),
    "gqa4-tq3-chunk48": (2, 3, 4, 1, 16, 97, BF16, dict(), [[2], [97]], 48),
    "window1": (2, 2, 2, 1, 16, 65, BF16, dict(window=1), [[1], [65]], 32),
    "window>=len-sinks": (1, 1, 3, 1, 16, 40, BF16, dict(window=100, sinks=2), [[40]], 32),
    "sinks>window": (2, 2, 4, 2, 16, 70, BF16, dict(window=3, sinks=40), [[70, 0], [45, 3]], 32),
    "sinks0-window5": (1, 4, 2, 1, 16, 129, F16, dict(window=5, sinks=0), [[129]], 32),
    "scale-0.5": (1, 1, 4, 4, 16, 33, BF16, dict(scale=0.5), [[33, 1, 0, 20]], None),
    "tq>len": (1, 4, 2, 1, 16, 20, BF16, dict(), [[2]], 32),
}


def _decode_lengths(lengths, b, hkv, smax, seed):
    if lengths is None:
        g = torch.Generator().manual_seed(seed)
        out = torch.randint(0, smax + 1, (b, hkv), generator=g, dtype=torch.int32)
        out[0, 0] = smax
        return out.to(DEVICE)
    return torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


@needs_attn_kernels
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_awkward(name) -> None:
    from memlab.ops.attention.decode_triton import decode_fwd

    b, tq, h, hkv, d, smax, dtype, opts, lengths, chunk = DECODE_CASES[name]
    seed = _seed(name)
    q = _randn((b, tq, h, d), dtype, seed)
    kc, vc = _randn((b, smax, hkv, d), dtype, seed + 1), _randn((b, smax, hkv, d), dtype, seed + 2)
    lengths = _decode_lengths(lengths, b, hkv, smax, seed)
    if chunk is None:
        o = decode(q, kc, vc, lengths, **opts)
    else:
        o = decode_fwd(q, kc, vc, lengths, scale=opts.get("scale", d**-0.5), window=opts.get("window"),
                       sinks=opts.get("sinks", 0), chunk=chunk, block_n=16)
    o64 = decode_reference(q.double(), kc.double(), vc.double(), lengths, **opts)
    assert_within_2x(name, o, o64, decode_reference(q, kc, vc, lengths, upcast=False, **opts))
    empty = (lengths.repeat_interleave(h // hkv, dim=1) == 0)[:, None, :].expand(b, tq, h)
    assert (o[empty] == 0).all()


@needs_attn_kernels
@pytest.mark.parametrize("d", attn_ops.HEAD_DIMS)
def test_decode_every_head_dim_and_split_count(d) -> None:
    """The same decode step at every head dim, with 1, 2 and several KV splits: equal results."""
    from memlab.ops.attention.decode_triton import decode_fwd

    b, tq, h, hkv, smax = 1, 2, 4, 2, 65
    q = _randn((b, tq, h, d), BF16, d)
    kc, vc = _randn((b, smax, hkv, d), BF16, d + 1), _randn((b, smax, hkv, d), BF16, d + 2)
    lengths = torch.tensor([[65, 30]], dtype=torch.int32, device=DEVICE)
    o64 = decode_reference(q.double(), kc.double(), vc.double(), lengths, window=20, sinks=1)
    naive = decode_reference(q, kc, vc, lengths, upcast=False, window=20, sinks=1)
    for chunk in (65, 48, 16):
        o = decode_fwd(q, kc, vc, lengths, scale=d**-0.5, window=20, sinks=1, chunk=chunk, block_n=16)
        assert_within_2x(f"d{d} chunk{chunk}", o, o64, naive)


@needs_attn_kernels
def test_decode_non_contiguous_inputs() -> None:
    """q a transposed view, caches (B, Hkv, Smax, D) viewed as (B, Smax, Hkv, D), v_cache with a
    non-unit last stride, lengths a transposed (non-contiguous) int64 tensor."""
    b, tq, h, hkv, d, smax = 3, 2, 6, 3, 16, 40
    q = _randn((b, h, tq, d), BF16, 1).transpose(1, 2)
    kc = _randn((b, hkv, smax, d), BF16, 2).transpose(1, 2)
    vc = _randn((b, smax, d, hkv), BF16, 3).transpose(2, 3)
    lengths = torch.tensor([[40, 0, 7], [1, 2, 39], [13, 40, 40]], device=DEVICE).t().contiguous().t()
    assert not lengths.is_contiguous()
    o = decode(q, kc, vc, lengths, window=8, sinks=1, scale=0.7)
    o64 = decode_reference(q.double(), kc.double(), vc.double(), lengths, window=8, sinks=1, scale=0.7)
    assert_within_2x("decode views", o, o64,
                     decode_reference(q, kc, vc, lengths, upcast=False, window=8, sinks=1, scale=0.7))


# ----------------------------------------------------------------------------------------------
# selective scan


SCAN_NAMES = ("x", "delta", "A", "B", "C", "D", "z", "h0")


def _scan_inputs(b, t, d, n, *, seed, has_d=True, has_z=True, has_h0=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    delta = 0.5 * torch.rand(b, t, d, generator=g) + 0.01
    a = -(torch.arange(1, n + 1).float() * (0.5 + torch.rand(d, 1, generator=g)))
    bm, cm = torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)
    dskip = torch.randn(d, generator=g) if has_d else None
    z = torch.randn(b, t, d, generator=g) if has_z else None
    h0 = torch.randn(b, d, n, generator=g) if has_h0 else None
    return [None if v is None else v.to(DEVICE) for v in (x, delta, a, bm, cm, dskip, z, h0)]


def _rel(got, ref):
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def _assert_scan_close(label, got, ref):
    y, h_t, grads = got
    y64, h64, grads64 = ref
    assert _rel(y, y64) < 1e-5, f"{label} y: {_rel(y, y64):.2e}"
    assert _rel(h_t, h64) < 1e-5, f"{label} h_T: {_rel(h_t, h64):.2e}"
    for name, g, r in zip(SCAN_NAMES, grads, grads64, strict=True):
        if r is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), f"{label} d{name}: non-finite"
        assert _rel(g, r) < 2e-5, f"{label} d{name}: relative error {_rel(g, r):.2e}"


def _as64(inputs):
    return [None if v is None else v.double() for v in inputs]


# (batch, T, d, N, has_D, has_z, has_h0)
SCAN_CASES = {
    "t2-n1": (3, 2, 3, 1, True, False, True),
    "t17-n3-d1": (1, 17, 1, 3, False, True, False),
    "t63-n7": (2, 63, 5, 7, True, True, True),
    "t129-n17-d9": (1, 129, 9, 17, False, False, True),
}


@needs_scan_kernels
@pytest.mark.parametrize("name", list(SCAN_CASES))
def test_scan_odd_shapes(name) -> None:
    b, t, d, n, has_d, has_z, has_h0 = SCAN_CASES[name]
    inputs = _scan_inputs(b, t, d, n, seed=_seed(name), has_d=has_d, has_z=has_z, has_h0=has_h0)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(b, t, d, generator=g).to(DEVICE)
    dh = torch.randn(b, d, n, generator=g).to(DEVICE)
    _assert_scan_close(name, scan_run(selective_scan, inputs, dy, dh),
                       scan_run(selective_scan_reference, _as64(inputs), dy, dh))


@needs_scan_kernels
def test_scan_chunked_with_state_passing_equals_one_pass() -> None:
    """Three calls (17 + 1 + 47 steps) through h0/h_T equal one call of 65 steps, outputs and
    gradients (including those that flow through the passed states)."""
    b, t, d, n = 2, 65, 5, 3
    inputs = _scan_inputs(b, t, d, n, seed=42)
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(b, t, d, generator=g).to(DEVICE)
    dh = torch.randn(b, d, n, generator=g).to(DEVICE)
    one = scan_run(selective_scan, inputs, dy, dh)

    given = [v.detach().clone().requires_grad_() for v in inputs]
    x, delta, a, bm, cm, dskip, z, h = given
    ys = []
    for lo, hi in ((0, 17), (17, 18), (18, t)):
        y, h = selective_scan(x[:, lo:hi], delta[:, lo:hi], a, bm[:, lo:hi], cm[:, lo:hi], dskip, z[:, lo:hi],
                              h0=h, return_state=True)
        ys.append(y)
    y = torch.cat(ys, dim=1)
    loss = (y.double() * dy.double()).sum() + (h.double() * dh.double()).sum()
    grads = torch.autograd.grad(loss, given)
    torch.testing.assert_close(y, one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, one[1], rtol=1e-5, atol=1e-5)
    for name, got, ref in zip(SCAN_NAMES, grads, one[2], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@needs_scan_kernels
def test_scan_gradient_through_final_state_only() -> None:
    """A loss on h_T alone (dy is None in the backward) and a loss on y alone (dh_T None)."""
    b, t, d, n = 1, 19, 3, 5
    inputs = _scan_inputs(b, t, d, n, seed=8, has_z=False)
    for use_y, use_h in ((False, True), (True, False)):
        outs = []
        for fn, ins in ((selective_scan, inputs), (selective_scan_reference, _as64(inputs))):
            given = [v.detach().clone().requires_grad_() if v is not None else None for v in ins]
            y, h_t = fn(*given[:7], h0=given[7], return_state=True)
            loss = y.double().square().sum() * use_y + h_t.double().square().sum() * use_h
            leaves = [v for v in given if v is not None]
            outs.append(torch.autograd.grad(loss, leaves))
        for got, ref in zip(*outs, strict=True):
            assert torch.isfinite(got).all() and _rel(got, ref) < 2e-5


@needs_scan_kernels
def test_scan_non_contiguous_and_half_inputs() -> None:
    """x and delta transposed views, A a transposed view, h0 bfloat16, D float16."""
    b, t, d, n = 2, 33, 6, 5
    g = torch.Generator().manual_seed(13)
    x = torch.randn(b, d, t, generator=g).to(DEVICE).transpose(1, 2)
    delta = (0.4 * torch.rand(b, d, t, generator=g) + 0.01).to(DEVICE).transpose(1, 2)
    a = (-torch.rand(n, d, generator=g) - 0.5).to(DEVICE).t()
    bm = torch.randn(b, n, t, generator=g).to(DEVICE).transpose(1, 2)
    cm = torch.randn(b, t, n, generator=g).to(DEVICE)
    dskip = torch.randn(d, generator=g).to(DEVICE, F16)
    h0 = torch.randn(b, d, n, generator=g).to(DEVICE, BF16)
    inputs = [x, delta, a, bm, cm, dskip, None, h0]
    dy, dh = torch.randn(b, t, d, generator=g).to(DEVICE), torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h_t, grads = scan_run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = scan_run(selective_scan_reference, _as64(inputs), dy, dh)
    assert _rel(y, y64) < 1e-5 and _rel(h_t, h64) < 1e-5
    for name, got, ref, inp in zip(SCAN_NAMES, grads, grads64, inputs, strict=True):
        if ref is None:
            continue
        assert got.dtype == inp.dtype, name
        tol = 2e-5 if inp.dtype == F32 else 1e-2
        assert _rel(got, ref) < tol, f"d{name}: {_rel(got, ref):.2e}"


# ----------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument, its value and what was expected


def _qkv(b=2, t=8, s=8, h=4, hkv=2, d=32, dtype=F16):
    return (torch.randn(b, t, h, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype),
            torch.randn(b, s, hkv, d, dtype=dtype))


def _same(q, k, v):
    return q, k, v


def _head_dim(n):
    return lambda q, k, v: (q[..., :n], k[..., :n], v[..., :n])


# name: (change of (q, k, v), keyword arguments, expected message)
ATTN_BAD = {
    "q-float64": (lambda q, k, v: (q.double(), k, v), {},
                  r"q must be float16, bfloat16 or float32, got .*float64"),
    "v-dtype": (lambda q, k, v: (q, k, v.bfloat16()), {},
                r"v must have q's dtype torch.float16, got .*bfloat16"),
    "k-heads": (lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
                {}, r"q heads H=4 must be a multiple of k heads Hkv=3"),
    "head-dim-24": (_head_dim(24), {},
                    r"q head dim D=24 is not supported: expected one of \(16, 32, 64, 128, 256\)"),
    "head-dim-8": (_head_dim(8), {}, r"D=8 is not supported"),
    "k-batch": (lambda q, k, v: (q, k[:1], v[:1]), {}, r"k must have batch size B=2 like q, got shape \(1,"),
    "k-rank": (lambda q, k, v: (q, k[0], v[0]), {},
               r"k must have shape \(B, S, Hkv, D\), got shape \(8, 2, 32\)"),
    "empty-T": (lambda q, k, v: (q[:, :0], k, v), {}, r"q and k must be non-empty"),
    "scale-nan": (_same, dict(scale=float("nan")), r"scale must be a positive finite .* got nan"),
    "scale-negative": (_same, dict(scale=-1.0), r"scale must be .* got -1.0"),
    "sinks-float": (_same, dict(sinks=1.5), r"sinks must be an int >= 0, got 1.5"),
    "window-bool": (_same, dict(window=True), r"window must be an int >= 1 or None, got True"),
    "q-list": (lambda q, k, v: (q.tolist(), k, v), {}, r"q must be a torch.Tensor of shape \(B, T, H, D\)"),
}


@pytest.mark.parametrize("name", list(ATTN_BAD))
def test_attention_bad_inputs_are_explained(name) -> None:
    change, kwargs, match = ATTN_BAD[name]
    with pytest.raises(ValueError, match=match):
        attention(*change(*_qkv()), **kwargs)


def test_window_without_causal_names_the_values() -> None:
    with pytest.raises(ValueError, match=r"need causal=True .*got causal=False with window=4"):
        attention(*_qkv(), window=4, causal=False)
    with pytest.raises(ValueError, match=r"need causal=True .*head_windows=\[-1, 2, 3, 4\]"):
        attention(*_qkv(), head_windows=[-1, 2, 3, 4], causal=False)


def test_attention_d256_gradient_error_names_the_dims() -> None:
    q, k, v = _qkv(d=256)
    with pytest.raises(ValueError, match=r"q head dim D=256 has no backward kernel.*\(16, 32, 64, 128\)"):
        attention(q.requires_grad_(), k, v)


def _dec(b=2, tq=1, h=4, hkv=2, d=32, smax=10):
    q = torch.randn(b, tq, h, d, dtype=F16)
    kc, vc = torch.randn(b, smax, hkv, d, dtype=F16), torch.randn(b, smax, hkv, d, dtype=F16)
    return q, kc, vc, torch.full((b, hkv), smax, dtype=torch.int32)


def _lengths(change):
    return lambda q, k, v, n: (q, k, v, change(n))


def _d48(q, k, v, n):
    return (torch.randn(2, 1, 4, 48, dtype=F16), torch.randn(2, 10, 2, 48, dtype=F16),
            torch.randn(2, 10, 2, 48, dtype=F16), n)


# name: (change of (q, k_cache, v_cache, lengths), expected message)
DECODE_BAD = {
    "length-above-capacity": (_lengths(lambda n: n + 1), r"lengths must lie in \[0, Smax=10\].*max 11"),
    "length-negative": (_lengths(lambda n: n - 11), r"lengths must lie in \[0, Smax=10\].*min -1"),
    "lengths-1d": (_lengths(lambda n: n[0]), r"lengths must be an integer tensor of shape \(B=2, Hkv=2\)"),
    "lengths-list": (_lengths(lambda n: n.tolist()), r"lengths must be .* got list"),
    "lengths-bool": (_lengths(lambda n: n > 0), r"lengths must hold integers, got .*bool"),
    "cache-dtype": (lambda q, k, v, n: (q, k.float(), v, n), r"k_cache must have q's dtype torch.float16"),
    "cache-head-dim": (lambda q, k, v, n: (q, k[..., :16], v[..., :16], n),
                       r"k_cache must have head dim D=32"),
    "head-dim-48": (_d48, r"q head dim D=48 is not supported"),
    "q-rank": (lambda q, k, v, n: (q[:, 0], k, v, n), r"q must have shape \(B, Tq, H, D\)"),
}


@pytest.mark.parametrize("name", list(DECODE_BAD))
def test_decode_bad_inputs_are_explained(name) -> None:
    change, match = DECODE_BAD[name]
    with pytest.raises(ValueError, match=match):
        decode(*change(*_dec()))


def test_decode_bad_options_are_explained() -> None:
    q, kc, vc, n = _dec()
    with pytest.raises(ValueError, match=r"sinks must be an int >= 0, got -2"):
        decode(q, kc, vc, n, sinks=-2)
    with pytest.raises(ValueError, match=r"scale must be a positive finite float or None, got 0"):
        decode(q, kc, vc, n, scale=0)
    with pytest.raises(ValueError, match=r"window must be an int >= 1 or None, got 0"):
        decode(q, kc, vc, n, window=0)


def _scan_args(**changes):
    x, delta, a, bm, cm, dskip, z, h0 = (v.cpu() for v in _scan_inputs(2, 5, 3, 4, seed=1))
    args = dict(x=x, delta=delta, A=a, B=bm, C=cm, D=dskip, z=z, h0=h0)
    args.update(changes)
    return args


SCAN_BAD = {
    "delta-dtype": (lambda: _scan_args(delta=torch.rand(2, 5, 3, dtype=torch.float64)),
                    r"delta must be float32, bfloat16 or float16, got .*float64"),
    "B-shape": (lambda: _scan_args(B=torch.randn(2, 5, 3)),
                r"B must have shape \(batch=2, T=5, N=4\), got shape \(2, 5, 3\)"),
    "h0-batch": (lambda: _scan_args(h0=torch.randn(1, 3, 4)),
                 r"h0 must have shape \(batch=2, d=3, N=4\), got shape \(1, 3, 4\)"),
    "A-1d": (lambda: _scan_args(A=-torch.rand(3)), r"A must be a torch.Tensor of shape \(d=3, N\)"),
    "N-zero": (lambda: _scan_args(A=-torch.rand(3, 0), B=torch.randn(2, 5, 0), C=torch.randn(2, 5, 0),
                                  h0=None), r"A's state size N=0 must lie in \[1, 256\]"),
    "x-list": (lambda: _scan_args(x=[1.0]), r"x must be a torch.Tensor of shape \(batch, T, d\), got list"),
    "return-state": (lambda: _scan_args(return_state=1), r"return_state must be a bool, got 1"),
}


@pytest.mark.parametrize("name", list(SCAN_BAD))
def test_scan_bad_inputs_are_explained(name) -> None:
    make, match = SCAN_BAD[name]
    args = make()
    with pytest.raises(ValueError, match=match):
        selective_scan(args.pop("x"), args.pop("delta"), args.pop("A"), args.pop("B"), args.pop("C"),
                       args.pop("D"), args.pop("z"), **args)
