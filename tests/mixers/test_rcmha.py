"""RCMHA: depthwise conv on q, k, v + relative positions; the scores are shift invariant."""

from __future__ import annotations

import math

import pytest
import torch

from memlab import mixers
from memlab.mixers.rcmha import distance_bucket

D = 16


def make(seed: int = 0, **cfg) -> mixers.Mixer:
    torch.manual_seed(seed)
    opts = {"n_heads": 2, "kernel_size": 3, **cfg}
    m = mixers.build("rcmha", d_model=D, **opts).double().eval()
    with torch.no_grad():  # non-zero relative parameters so the positional term matters
        for name, p in m.named_parameters():
            if name in ("u", "w", "bucket_bias"):
                p.normal_()
    return m


def reference(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """The RCMHA formulas written out token by token."""
    b, t, d = x.shape
    h, hd, k_size = m.n_heads, m.head_dim, m.config.kernel_size
    proj = m.qkv_proj(x)
    w = m.conv_weight[:, 0, :]  # (3d, K)
    conv = torch.zeros_like(proj)
    for i in range(t):
        for tap in range(k_size):
            src = i - (k_size - 1) + tap
            if src >= 0:
                conv[:, i] += proj[:, src] * w[:, tap]
    q, k, v = conv.view(b, t, 3, h, hd).unbind(2)  # (B, T, H, D) each
    out = torch.zeros(b, t, h, hd, dtype=x.dtype)
    for i in range(t):
        scores = []
        for j in range(i + 1):
            dist = i - j
            if m.config.relative == "xl":
                phi = [math.sin(dist / 10000 ** (2 * f / d)) for f in range(d // 2)]
                phi += [math.cos(dist / 10000 ** (2 * f / d)) for f in range(d // 2)]
                r = m.r_proj(torch.tensor(phi, dtype=x.dtype)).view(h, hd)
                s = ((q[:, i] + m.u) * k[:, j]).sum(-1) + ((q[:, i] + m.w) * r).sum(-1)
                scores.append(s / math.sqrt(hd))
            else:
                bucket = distance_bucket(torch.tensor(dist), m.config.n_buckets, m.config.max_distance)
                scores.append((q[:, i] * k[:, j]).sum(-1) / math.sqrt(hd) + m.bucket_bias[:, bucket])
        p = torch.softmax(torch.stack(scores, -1), -1)  # (B, H, i+1)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", p, v[:, : i + 1])
    return m.o_proj(out.reshape(b, t, d))


@pytest.mark.parametrize("relative", ["xl", "bucket"])
def test_matches_token_by_token_formula(relative: str) -> None:
    m = make(relative=relative, n_buckets=6, max_distance=9)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        torch.testing.assert_close(y, reference(m, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("relative", ["xl", "bucket"])
def test_scores_shift_invariant(relative: str) -> None:
    m = make(relative=relative, n_buckets=8, max_distance=20)
    q = torch.randn(1, 2, 7, D // 2, dtype=torch.float64)
    k = torch.randn(1, 2, 11, D // 2, dtype=torch.float64)
    q_pos = torch.arange(4, 11)
    k_pos = torch.arange(0, 11)
    with torch.no_grad():
        base = m.scores(q, k, q_pos, k_pos)
        for shift in (1, 5, 300):
            shifted = m.scores(q, k, q_pos + shift, k_pos + shift)
            torch.testing.assert_close(shifted, base, atol=1e-12, rtol=0)
    assert torch.isinf(base[..., 0, 5:]).all() and torch.isfinite(base[..., -1, :]).all()


@pytest.mark.parametrize("relative", ["xl", "bucket"])
def test_positional_term_depends_on_distance_only(relative: str) -> None:
    """With the same query at every position, the positional term is constant along diagonals."""
    m = make(relative=relative, n_buckets=8, max_distance=20)
    q = torch.randn(1, 2, 1, D // 2, dtype=torch.float64).expand(1, 2, 12, D // 2)
    pos = torch.arange(12)
    distance = pos[:, None] - pos[None, :]
    with torch.no_grad():
        term = m.positional_term(q, distance)
    for dist in range(12):
        diag = torch.diagonal(term, offset=-dist, dim1=-2, dim2=-1)  # entries with i - j = dist
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), atol=1e-12, rtol=0)
    assert (term[..., 11, 0] - term[..., 11, 11]).abs().max() > 1e-3  # distance does matter


def test_output_independent_of_absolute_start() -> None:
    """No absolute positions: the same tokens give the same outputs at any starting offset."""
    m = make()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    with torch.no_grad():
        y0, _ = m(x)
        state = m.init_state(2, x.device, x.dtype)
        state["pos"] = 1000
        y1, _ = m(x, state=state)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)


def test_bucket_mode_chunked_and_decode() -> None:
    m = make(relative="bucket", n_buckets=6, max_distance=9)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        state, outs = None, []
        for i in range(23):
            y, state = m(x[:, i : i + 1], state=state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


def test_distance_bucket_values() -> None:
    d = torch.arange(0, 300)
    ids = distance_bucket(d, 32, 128)
    assert ids[:16].tolist() == list(range(16))
    assert (ids[1:] >= ids[:-1]).all()
    assert (ids[128:] == 31).all() and ids[100] < 31  # log spacing saturates near max_distance
    assert ids.max() == 31


def test_conv_state_keeps_kernel_minus_one_inputs() -> None:
    m = make(kernel_size=5)
    with torch.no_grad():
        _, state = m(torch.randn(1, 3, D, dtype=torch.float64))
    assert state["conv"].shape == (1, 4, 3 * D)
    assert state["conv"][:, 0].abs().max() == 0  # only 3 tokens seen: the oldest slot is padding


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"kernel_size": 0}, "kernel_size"),
        ({"n_heads": 3}, "n_heads"),
        ({"relative": "rope"}, "relative"),
        ({"relative": "bucket", "n_buckets": 1}, "n_buckets"),
        ({"relative": "bucket", "n_buckets": 32, "max_distance": 10}, "max_distance"),
    ],
)
def test_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("rcmha", d_model=D, **cfg)
