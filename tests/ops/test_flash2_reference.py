"""The flash2 references against independent constructions, and the public input checks.

Runs without Triton: the references are plain PyTorch, and the checks fire before dispatch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memlab.ops.attention import attention, attention_reference, decode, decode_reference
from memlab.ops.attention.decode_grouped import decode_grouped

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _brute_force(q, k, v, *, causal, window, sinks, windows_per_head=None):
    """Per query and head: softmax over the explicitly listed visible keys (an independent spec)."""
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            w = window if windows_per_head is None else windows_per_head[hi]
            for ti in range(t):
                p = ti + s - t
                keys = [
                    j for j in range(s)
                    if (not causal or j <= p) and (w is None or w < 0 or j > p - w or j < sinks)
                ]
                if not keys:
                    continue
                kk = k[bi, keys, hi // (h // hkv)]
                vv = v[bi, keys, hi // (h // hkv)]
                att = torch.softmax(kk @ q[bi, ti, hi] / math.sqrt(d), dim=0)
                out[bi, ti, hi] = att @ vv
    return out


@pytest.mark.parametrize(
    "t,s,h,hkv,causal",
    [(7, 7, 4, 2, True), (5, 9, 4, 1, True), (9, 5, 2, 2, True), (6, 11, 4, 4, False)],
)
def test_reference_matches_sdpa_with_explicit_mask(t, s, h, hkv, causal) -> None:
    q, k, v = _rand(2, t, h, 16, seed=0), _rand(2, s, hkv, 16, seed=1), _rand(2, s, hkv, 16, seed=2)
    o = attention_reference(q, k, v, causal=causal)
    rep = h // hkv
    mask = torch.ones(t, s, dtype=torch.bool)
    if causal:
        mask = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
        v.transpose(1, 2).repeat_interleave(rep, 1), attn_mask=mask,
    ).transpose(1, 2)
    seen = mask.any(dim=1)  # queries with no key: SDPA gives NaN, the spec gives zeros
    torch.testing.assert_close(o[:, seen], ref[:, seen], atol=1e-12, rtol=0)
    assert (o[:, ~seen] == 0).all()
    if not seen.all():
        assert (~seen).sum() == t - s


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (3, 2), (20, 1)])
def test_reference_window_and_sinks_match_brute_force(window, sinks) -> None:
    q, k, v = _rand(1, 9, 4, 8, seed=3), _rand(1, 12, 2, 8, seed=4), _rand(1, 12, 2, 8, seed=5)
    o = attention_reference(q, k, v, causal=True, window=window, sinks=sinks)
    ref = _brute_force(q, k, v, causal=True, window=window, sinks=sinks)
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)


def test_reference_head_windows_match_brute_force() -> None:
    windows = [-1, 2, 5, 1]
    q, k, v = _rand(2, 10, 4, 8, seed=6), _rand(2, 10, 2, 8, seed=7), _rand(2, 10, 2, 8, seed=8)
    o = attention_reference(q, k, v, head_windows=torch.tensor(windows), sinks=2)
    ref = _brute_force(q, k, v, causal=True, window=None, sinks=2, windows_per_head=windows)
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)


def test_reference_varlen_equals_separate_sequences() -> None:
    cu = torch.tensor([0, 3, 3, 10, 16], dtype=torch.int32)
    q, k, v = _rand(1, 16, 4, 8, seed=9), _rand(1, 16, 2, 8, seed=10), _rand(1, 16, 2, 8, seed=11)
    o = attention_reference(q, k, v, cu_seqlens=cu, window=4, sinks=1)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if b > a:
            part = attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], window=4, sinks=1)
            torch.testing.assert_close(o[:, a:b], part, atol=0, rtol=0)


def test_reference_lse_and_empty_rows() -> None:
    q = _rand(1, 6, 2, 8, seed=12).requires_grad_()
    k, v = _rand(1, 4, 1, 8, seed=13).requires_grad_(), _rand(1, 4, 1, 8, seed=14).requires_grad_()
    o, lse = attention_reference(q, k, v, causal=True, return_lse=True)
    # S < T: the first two queries see no key.
    assert (o[:, :2] == 0).all() and torch.isinf(lse[..., :2]).all() and (lse[..., :2] < 0).all()
    scores = torch.einsum("bthd,bshd->bhts", q, k.expand(-1, -1, 2, -1)) / math.sqrt(8)
    expect = torch.logsumexp(scores.masked_fill(torch.ones(6, 4).triu(-1).bool(), float("-inf")), -1)
    torch.testing.assert_close(lse[..., 2:], expect[..., 2:], atol=1e-12, rtol=0)
    (o * _rand(*o.shape, seed=15)).sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[:, :2] == 0).all()


def test_decode_reference_equals_attention_on_each_cache() -> None:
    b, tq, h, hkv, d, smax = 3, 2, 8, 2, 16, 11
    q = _rand(b, tq, h, d, seed=16)
    kc, vc = _rand(b, smax, hkv, d, seed=17), _rand(b, smax, hkv, d, seed=18)
    lengths = torch.tensor([[11, 5], [2, 7], [9, 1]], dtype=torch.int32)
    o = decode_reference(q, kc, vc, lengths, window=4, sinks=1)
    g = h // hkv
    for bi in range(b):
        for kh in range(hkv):
            n = int(lengths[bi, kh])
            heads = slice(kh * g, (kh + 1) * g)
            ref = attention_reference(
                q[bi : bi + 1, :, heads], kc[bi : bi + 1, :n, kh : kh + 1], vc[bi : bi + 1, :n, kh : kh + 1],
                window=4, sinks=1,
            )
            torch.testing.assert_close(o[bi : bi + 1, :, heads], ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("h,hkv,tq", [(8, 2, 2), (6, 6, 1), (9, 3, 3), (4, 1, 1)])
@pytest.mark.parametrize("opts", [{}, {"window": 4, "sinks": 1}, {"window": 1}, {"scale": 0.3}])
def test_decode_grouped_equals_the_reference(h: int, hkv: int, tq: int, opts: dict) -> None:
    """The CPU decoding path (no copies of the KV heads) computes the reference's function:
    ragged lengths, an empty cache, windows and sinks, several queries, GQA ratios 1 to 4."""
    b, d, smax = 3, 16, 11
    q = _rand(b, tq, h, d, seed=22)
    kc, vc = _rand(b, smax, hkv, d, seed=23), _rand(b, smax, hkv, d, seed=24)
    lengths = torch.randint(tq, smax + 1, (b, hkv), generator=torch.Generator().manual_seed(25))
    lengths[0, 0] = 0  # a (batch, head) with nothing cached
    ref = decode_reference(q, kc, vc, lengths, **opts)
    torch.testing.assert_close(decode_grouped(q, kc, vc, lengths, **opts), ref, atol=1e-12, rtol=0)
    got32 = decode(q.float(), kc.float(), vc.float(), lengths, **opts)  # what decode runs on CPU
    torch.testing.assert_close(got32.double(), ref, atol=1e-5, rtol=0)
    # and its gradients (decode is differentiable on this path)
    leaves = [t.clone().requires_grad_() for t in (q, kc, vc)]
    w = _rand(*ref.shape, seed=26)
    (decode_grouped(*leaves, lengths, **opts) * w).sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, kc, vc)]
    (decode_reference(*refs, lengths, **opts) * w).sum().backward()
    for got, want in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_and_attention_run_on_cpu_in_every_dtype(dtype) -> None:
    q, kc, vc = _rand(2, 1, 4, 64, seed=19), _rand(2, 9, 2, 64, seed=20), _rand(2, 9, 2, 64, seed=21)
    lengths = torch.tensor([[9, 3], [0, 6]], dtype=torch.int32)
    ref = decode_reference(q, kc, vc, lengths)
    o = decode(q.to(dtype), kc.to(dtype), vc.to(dtype), lengths)
    assert o.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(o.double(), ref, atol=tol, rtol=0)
    assert (o[1, :, :2] == 0).all()  # a cache with no key gives zeros
    a = attention(q.to(dtype), kc.to(dtype), vc.to(dtype), causal=False)
    torch.testing.assert_close(a.double(), attention_reference(q, kc, vc, causal=False), atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------
# input checks (they run before dispatch, so on every device)


def _qkv(t=8, s=8, h=4, hkv=2, d=64, dtype=torch.float16):
    return (torch.randn(2, t, h, d, dtype=dtype), torch.randn(2, s, hkv, d, dtype=dtype),
            torch.randn(2, s, hkv, d, dtype=dtype))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must have shape \(B, T, H, D\)"),
        (lambda q, k, v: (q, k, v[:, :5]), "v must have k's shape"),
        (lambda q, k, v: (q, k[:1], v[:1]), "k must have batch size B=2"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), "k must have head dim D=64"),
        (lambda q, k, v: (q[:, :, :3], k, v), "q heads H=3 must be a multiple of k heads Hkv=2"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "q head dim D=48 is not supported"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "q must be float16"),
        (lambda q, k, v: (q, k.float(), v), "k must have q's dtype"),
        (lambda q, k, v: (q.int(), k, v), "q must be float16, bfloat16 or float32"),
    ],
)
def test_attention_rejects_bad_tensors(change, match) -> None:
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), "window must be an int >= 1"),
        (dict(window=-3), "window must be an int >= 1"),
        (dict(window=2.5), "window must be an int >= 1"),
        (dict(sinks=-1), "sinks must be an int >= 0"),
        (dict(scale=0.0), "scale must be a positive finite float"),
        (dict(window=4, causal=False), "need causal=True"),
        (dict(window=4, head_windows=[-1, 2, 3, 4]), "not both"),
        (dict(head_windows=[1, 2, 3]), r"head_windows must have shape \(H=4,\)"),
        (dict(head_windows=[1, 0, 3, 4]), "head_windows entries must be -1"),
        (dict(head_windows=torch.ones(4)), "head_windows must hold integers"),
        (dict(causal=1), "causal must be a bool"),
    ],
)
def test_attention_rejects_bad_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        attention(*_qkv(), **kwargs)


def test_attention_rejects_bad_cu_seqlens() -> None:
    q, k, v = (x[:1] for x in _qkv(t=8, s=8))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=8"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=8"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 7]))
    with pytest.raises(ValueError, match="cu_seqlens must hold integers"):
        attention(q, k, v, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="q must have B=1"):
        attention(*_qkv(), cu_seqlens=torch.tensor([0, 8]))
    q2, k2, v2 = (x[:1] for x in _qkv(t=8, s=6))
    with pytest.raises(ValueError, match="k must have S=T=8"):
        attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 8]))


def test_attention_d256_has_no_backward() -> None:
    q, k, v = _qkv(d=256)
    q.requires_grad_()
    with pytest.raises(ValueError, match="D=256 has no backward kernel"):
        attention(q, k, v)
    with torch.no_grad():
        assert attention(q, k, v).shape == q.shape


def test_decode_rejects_bad_input() -> None:
    q = torch.randn(2, 1, 4, 64, dtype=torch.float16)
    kc, vc = torch.randn(2, 10, 2, 64, dtype=torch.float16), torch.randn(2, 10, 2, 64, dtype=torch.float16)
    ok = torch.tensor([[10, 3], [0, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, Smax=10\]"):
        decode(q, kc, vc, torch.tensor([[11, 3], [0, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, Smax=10\]"):
        decode(q, kc, vc, torch.tensor([[1, -1], [0, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(B=2, Hkv=2\)"):
        decode(q, kc, vc, ok[:, :1])
    with pytest.raises(ValueError, match="lengths must hold integers"):
        decode(q, kc, vc, ok.float())
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        decode(q, kc, vc[:, :9], ok)
    with pytest.raises(ValueError, match="q heads H=4 must be a multiple of k_cache heads Hkv=3"):
        kc3 = torch.randn(2, 10, 3, 64, dtype=torch.float16)
        decode(q, kc3, kc3.clone(), torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        decode(q, kc, vc, ok, window=0)
    with pytest.raises(ValueError, match="q head dim D=40 is not supported"):
        decode(q[..., :40], kc[..., :40], vc[..., :40], ok)


def test_import_and_cpu_path_survive_a_missing_triton() -> None:
    """Kernels import lazily: without Triton the package imports and the reference path runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, memlab.ops.attention as A\n"
        "q = torch.randn(1, 5, 2, 16)\n"
        "o = A.attention(q, q, q)\n"
        "assert not A.kernels_available() and torch.isfinite(o).all()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
