"""based: the Taylor feature map identity, chunked == recurrent == dense quadratic reference,
the exact sliding-window branch, the short convolution and the state layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.based import sliding_window_attention, taylor_feature_map
from memlab.mixers.linear_core import chunked_linear_attention, recurrent_linear_attention
from memlab.mixers.rope import rotary
from memlab.ops import taylor

ATOL = 1e-10  # float64


@pytest.mark.parametrize("d", [1, 4, 16])
def test_taylor_map_is_second_order_exp(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    q = torch.randn(50, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(50, d, generator=g, dtype=torch.float64) * 2
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    assert fq.shape == (50, 1 + d + d * d)
    s = (q * k).sum(-1) / math.sqrt(d)
    torch.testing.assert_close((fq * fk).sum(-1), 1 + s + s**2 / 2, atol=1e-11, rtol=1e-13)
    # A second-order Taylor polynomial of exp is at least 1/2 everywhere: the normaliser is safe.
    assert ((fq * fk).sum(-1) >= 0.5 - 1e-12).all()


def taylor_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The causal (T, T) matrix 1 + s + s^2/2 written directly from q, k (B, H, T, d'); no feature map."""
    t, d = q.shape[2], q.shape[3]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    a = (1 + s + s**2 / 2) * torch.ones(t, t, dtype=q.dtype).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_taylor_linear_attention_chunked_recurrent_dense(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, t, d, dv = 2, 2, 33, 4, 6
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    f = fq.shape[-1]
    kv0 = torch.zeros(b, h, f, dv, dtype=torch.float64)
    z0 = torch.zeros(b, h, f, dtype=torch.float64)
    ref = taylor_dense(q, k, v, eps=1e-12)
    chk, kv_c, z_c = chunked_linear_attention(fq, fk, v, kv0, z0, chunk_size=chunk_size, eps=1e-12)
    rec, kv_r, z_r = recurrent_linear_attention(fq, fk, v, kv0, z0, eps=1e-12)
    torch.testing.assert_close(chk, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(kv_c, kv_r, atol=ATOL, rtol=0)
    torch.testing.assert_close(z_c, z_r, atol=ATOL, rtol=0)


def window_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Softmax attention over keys in (t - window, t] with an explicit (T, T) mask."""
    t = q.shape[2]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = (j <= i) & (j > i - window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(("t", "window"), [(1, 4), (3, 4), (20, 4), (37, 8), (9, 1), (10, 64)])
def test_sliding_window_blocks_equal_dense(t: int, window: int) -> None:
    g = torch.Generator().manual_seed(t * 100 + window)
    q, k, v = (torch.randn(2, 3, t, 5, generator=g, dtype=torch.float64) for _ in range(3))
    empty = torch.zeros(2, 3, window - 1, 5, dtype=torch.float64)
    out = sliding_window_attention(q, k, v, empty, empty, 0, window)
    torch.testing.assert_close(out, window_dense(q, k, v, window), atol=ATOL, rtol=0)


@pytest.mark.parametrize("split", [1, 2, 6, 13])
def test_sliding_window_with_partial_cache(split: int) -> None:
    """The second call sees exactly min(split, window - 1) cached keys, whatever the split point."""
    window, t = 7, 25
    g = torch.Generator().manual_seed(split)
    q, k, v = (torch.randn(1, 2, t, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keep = window - 1
    # A right-aligned cache of the first `split` tokens, garbage (never attended) in unwritten slots.
    k_cache = torch.full((1, 2, keep, 4), 1e3, dtype=torch.float64)
    v_cache = torch.full((1, 2, keep, 4), 1e3, dtype=torch.float64)
    n = min(split, keep)
    k_cache[:, :, keep - n :] = k[:, :, split - n : split]
    v_cache[:, :, keep - n :] = v[:, :, split - n : split]
    new = (q[:, :, split:], k[:, :, split:], v[:, :, split:])
    out = sliding_window_attention(*new, k_cache, v_cache, n, window)
    torch.testing.assert_close(out, window_dense(q, k, v, window)[:, :, split:], atol=ATOL, rtol=0)


def based_reference(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """The whole mixer computed densely from its own parameters, independent of chunking and caches."""
    c = m.config
    b, t, d = x.shape
    u = x
    if c.conv_size:
        u = F.conv1d(F.pad(x.transpose(1, 2), (c.conv_size - 1, 0)), m.conv.weight, groups=d).transpose(1, 2)
    q = m.q_proj(u).view(b, t, c.n_heads, -1).transpose(1, 2)
    k = m.k_proj(u).view(b, t, c.n_heads, -1).transpose(1, 2)
    v = m.v_proj(u).view(b, t, c.n_heads, -1).transpose(1, 2)
    y = m.o_proj(taylor_dense(q, k, v, c.eps).transpose(1, 2).reshape(b, t, d))
    if c.window:
        wq, wk, wv = m.win_qkv(u).view(b, t, 3, c.window_heads, -1).permute(2, 0, 3, 1, 4)
        if c.rope:
            wq, wk = rotary(wq, torch.arange(t), c.rope_base), rotary(wk, torch.arange(t), c.rope_base)
        y = y + m.win_o(window_dense(wq, wk, wv, c.window).transpose(1, 2).reshape(b, t, d))
    return y


@pytest.mark.parametrize(
    "options",
    [
        {"window": 0, "conv_size": 0},
        {"window": 0, "conv_size": 3, "n_heads": 2, "chunk_size": 8},
        {"window": 5, "conv_size": 0, "window_heads": 2},
        {"window": 64, "conv_size": 3},
        {"window": 3, "conv_size": 4, "n_heads": 4, "feature_dim": 3, "window_heads": 4, "rope": False},
    ],
)
def test_mixer_matches_dense_reference(options: dict) -> None:
    torch.manual_seed(0)
    m = mixers.build("based", d_model=16, feature_dim=options.pop("feature_dim", 4), **options).double()
    x = torch.randn(2, 41, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        ref = based_reference(m, x)
        # Chunked state passing and decoding reproduce it as well.
        y1, s = m(x[:, :17])
        y2, s = m(x[:, 17:18], state=s)
        y3, _ = m(x[:, 18:], state=s)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), ref, atol=ATOL, rtol=0)


def test_state_layout_and_size() -> None:
    d, h, fd, w, hw, k = 32, 2, 4, 10, 4, 3
    m = mixers.build(
        "based", d_model=d, n_heads=h, feature_dim=fd, window=w, window_heads=hw, conv_size=k
    ).double()
    f = 1 + fd + fd * fd
    with torch.no_grad():
        _, s3 = m(torch.randn(3, 3, d, dtype=torch.float64))  # fewer tokens than the window
        _, s90 = m(torch.randn(3, 90, d, dtype=torch.float64))
    assert s90["kv"].shape == (3, h, f, d // h)
    assert s90["win_k"].shape == (3, hw, w - 1, d // hw)
    assert s90["conv"].shape == (3, k - 1, d)
    expected = 8 * 3 * (h * f * (d // h) + h * f + 2 * hw * (w - 1) * (d // hw) + (k - 1) * d)
    assert mixers.state_nbytes(s3) == mixers.state_nbytes(s90) == expected
    off = mixers.build("based", d_model=d, window=0, conv_size=0).double()
    with torch.no_grad():
        _, s = off(torch.randn(1, 5, d, dtype=torch.float64))
    assert set(s) == {"kv", "z", "pos"}
    assert mixers.state_nbytes(s) == 8 * (17 + 16 * 16) * (d + 1)


def test_window_branch_adds_exact_local_recall() -> None:
    """Turning the window on changes the output only by the window branch's own term."""
    torch.manual_seed(0)
    with_w = mixers.build("based", d_model=16, feature_dim=4, window=4).double()
    without = mixers.build("based", d_model=16, feature_dim=4, window=0).double()
    without.load_state_dict({k: v for k, v in with_w.state_dict().items() if not k.startswith("win_")})
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        diff = with_w(x)[0] - without(x)[0]
        u = F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), with_w.conv.weight, groups=16).transpose(1, 2)
        wq, wk, wv = with_w.win_qkv(u).view(1, 12, 3, 1, 16).permute(2, 0, 3, 1, 4)
        pos = torch.arange(12)
        o = window_dense(rotary(wq, pos), rotary(wk, pos), wv, 4)
        expected = with_w.win_o(o.transpose(1, 2).reshape(1, 12, 16))
    torch.testing.assert_close(diff, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"window": -1}, "window"),
        ({"conv_size": -2}, "conv_size"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"n_heads": 3}, "n_heads"),
        ({"window_heads": 5}, "window_heads"),
        ({"eps": -1.0}, "eps"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"d_model": 18, "window_heads": 2}, "rope"),
        ({"taylor_order": 3}, "taylor_order"),
    ],
)
def test_config_errors(options: dict, match: str) -> None:
    d_model = options.pop("d_model", 16)
    with pytest.raises(ValueError, match=match):
        mixers.build("based", d_model=d_model, **options)


FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    not taylor.uses_kernels(torch.zeros(1, device=FUSED_DEVICE)),
    reason="the fused Taylor kernel needs a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("t", [1, 45])
def test_fused_prefill_equals_chunked_form(t: int) -> None:
    """A prefill from the empty state through the fused kernel gives the chunked feature-map form's
    outputs, state and gradients (float32, so the kernel runs), and decoding continues alike."""
    torch.manual_seed(3)
    opts = dict(d_model=32, n_heads=2, feature_dim=6, chunk_size=8, window=5, window_heads=2)
    fused = mixers.build("based", fused=True, **opts).to(FUSED_DEVICE)
    plain = mixers.build("based", fused=False, **opts).to(FUSED_DEVICE)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, t, 32, device=FUSED_DEVICE, requires_grad=True)
    g = torch.randn(2, t, 32, device=FUSED_DEVICE)
    y_f, s_f = fused(x)
    y_p, s_p = plain(x)
    assert (y_f - y_p).abs().max().item() < 1e-5
    for name in ("kv", "z", "win_k", "conv"):
        assert (s_f[name] - s_p[name]).abs().max().item() < 1e-4 * (1 + s_p[name].abs().max().item())
    gx_f, *gw_f = torch.autograd.grad((y_f * g).sum(), [x, *fused.parameters()])
    gx_p, *gw_p = torch.autograd.grad((y_p * g).sum(), [x, *plain.parameters()])
    assert (gx_f - gx_p).abs().max().item() < 1e-4
    for a, b in zip(gw_f, gw_p, strict=True):
        assert (a - b).abs().max().item() < 1e-4 * (1 + b.abs().max().item())
    nxt = torch.randn(2, 1, 32, device=FUSED_DEVICE)
    assert (fused(nxt, state=s_f)[0] - plain(nxt, state=s_p)[0]).abs().max().item() < 1e-5
