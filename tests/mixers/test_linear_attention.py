"""linear_attention and the shared chunked core: chunked == recurrent == dense quadratic reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.linear_attention import FEATURE_MAPS
from memlab.mixers.linear_core import chunked_linear_attention, recurrent_linear_attention

ATOL = 1e-10  # float64


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, normalize: bool = True
) -> torch.Tensor:
    """The (T, T) masked score matrix phi(q) phi(k)^T, written out: q, k (B, H, T, F), v (B, H, T, Dv)."""
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * torch.ones(t, t, dtype=q.dtype).tril()
    out = scores @ v
    if normalize:
        out = out / (scores.sum(-1, keepdim=True) + eps)
    return out


def random_features(b=2, h=3, t=29, f=5, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.elu(torch.randn(b, h, t, f, generator=g, dtype=torch.float64)) + 1
    k = F.elu(torch.randn(b, h, t, f, generator=g, dtype=torch.float64)) + 1
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 64])
def test_chunked_equals_recurrent_equals_dense(chunk_size: int) -> None:
    q, k, v = random_features()
    kv0 = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    ref = dense_reference(q, k, v, eps=1e-6)
    rec, kv_r, z_r = recurrent_linear_attention(q, k, v, kv0, z0, eps=1e-6)
    chk, kv_c, z_c = chunked_linear_attention(q, k, v, kv0, z0, chunk_size=chunk_size, eps=1e-6)
    torch.testing.assert_close(rec, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(chk, ref, atol=ATOL, rtol=0)
    # The state is the sum over all tokens of phi(k) v^T and of phi(k).
    torch.testing.assert_close(kv_c, torch.einsum("bhtf,bhtd->bhfd", k, v), atol=ATOL, rtol=0)
    torch.testing.assert_close(z_c, k.sum(2), atol=ATOL, rtol=0)
    torch.testing.assert_close(kv_r, kv_c, atol=ATOL, rtol=0)
    torch.testing.assert_close(z_r, z_c, atol=ATOL, rtol=0)


def test_chunked_continues_from_a_state() -> None:
    """Splitting the sequence and passing (kv, z) equals one pass over the whole sequence."""
    q, k, v = random_features(t=30)
    kv0 = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    full, _, _ = chunked_linear_attention(q, k, v, kv0, z0, chunk_size=8, eps=1e-6)
    head, tail = (q[:, :, :11], k[:, :, :11], v[:, :, :11]), (q[:, :, 11:], k[:, :, 11:], v[:, :, 11:])
    a, kv, z = chunked_linear_attention(*head, kv0, z0, chunk_size=8, eps=1e-6)
    b, _, _ = chunked_linear_attention(*tail, kv, z, chunk_size=8, eps=1e-6)
    torch.testing.assert_close(torch.cat([a, b], dim=2), full, atol=ATOL, rtol=0)


def test_unnormalized_form() -> None:
    q, k, v = random_features()
    q, k = q - 1.3, k - 1.3  # signed features, as with the identity map
    kv0 = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    ref = dense_reference(q, k, v, eps=1e-6, normalize=False)
    chk, _, _ = chunked_linear_attention(q, k, v, kv0, z0, chunk_size=6, eps=1e-6, normalize=False)
    rec, _, _ = recurrent_linear_attention(q, k, v, kv0, z0, eps=1e-6, normalize=False)
    torch.testing.assert_close(chk, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec, ref, atol=ATOL, rtol=0)


def mixer_reference(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer's function computed densely from its own projections."""
    c = m.config
    b, t, _ = x.shape
    phi = FEATURE_MAPS[c.feature_map]
    q = phi(m.q_proj(x).view(b, t, c.n_heads, -1).transpose(1, 2))
    k = phi(m.k_proj(x).view(b, t, c.n_heads, -1).transpose(1, 2))
    v = m.v_proj(x).view(b, t, c.n_heads, -1).transpose(1, 2)
    o = dense_reference(q, k, v, c.eps, c.normalize)
    return m.o_proj(o.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize(
    "options",
    [
        {"feature_map": "elu"},
        {"feature_map": "relu", "chunk_size": 5},
        {"feature_map": "identity", "normalize": False, "chunk_size": 3},
        {"feature_map": "elu", "feature_dim": 3, "n_heads": 4},
    ],
)
def test_mixer_matches_dense_reference(options: dict) -> None:
    torch.manual_seed(0)
    m = mixers.build("linear_attention", d_model=16, **options).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = m(x)
        ref = mixer_reference(m, x)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    assert state["kv"].shape == (2, m.n_heads, m.feature_dim, m.head_dim)


def test_chunk_size_does_not_change_the_function() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 50, 16, dtype=torch.float64)
    outs = []
    for cs in (1, 8, 64):
        torch.manual_seed(3)
        m = mixers.build("linear_attention", d_model=16, chunk_size=cs).double()
        with torch.no_grad():
            outs.append(m(x)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=ATOL, rtol=0)


def test_state_bytes_are_kv_plus_normaliser() -> None:
    m = mixers.build("linear_attention", d_model=32, n_heads=4, feature_dim=6).double()
    with torch.no_grad():
        _, state = m(torch.randn(3, 100, 32, dtype=torch.float64))
    assert mixers.state_nbytes(state) == 8 * 3 * 4 * (6 * 8 + 6)


def test_elu_normaliser_gives_a_convex_combination() -> None:
    """With positive features the output before o_proj is a weighted mean of past values."""
    q, k, v = random_features(t=20)
    v = torch.ones_like(v) * 2.5
    kv0 = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    y, _, _ = chunked_linear_attention(q, k, v, kv0, z0, chunk_size=6, eps=1e-12)
    torch.testing.assert_close(y, torch.full_like(y, 2.5), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"feature_map": "softmax"}, "feature_map"),
        ({"feature_map": "identity"}, "normalize"),
        ({"eps": 0.0}, "eps"),
        ({"n_heads": 3}, "n_heads"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"gate": True}, "gate"),
    ],
)
def test_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("linear_attention", d_model=16, **options)


def test_core_shape_errors() -> None:
    q, k, v = random_features()
    kv0 = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="q and k"):
        chunked_linear_attention(q, k[:, :, :3], v, kv0, z0, chunk_size=4, eps=1e-6)
    with pytest.raises(ValueError, match="v must"):
        chunked_linear_attention(q, k, v[:, :2], kv0, z0, chunk_size=4, eps=1e-6)
    with pytest.raises(ValueError, match="kv must"):
        recurrent_linear_attention(q, k, v, kv0[..., :2], z0, eps=1e-6)
    with pytest.raises(ValueError, match="z must"):
        recurrent_linear_attention(q, k, v, kv0, z0[..., :2], eps=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_attention(q, k, v, kv0, z0, chunk_size=0, eps=1e-6)
