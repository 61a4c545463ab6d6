"""Routing Transformer: queries attend only inside their cluster (routing heads) or window (local
heads); k-means centroids start from the data and follow their EMA formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlab import mixers
from memlab.mixers.routing import SELF_SCORE, banded_attention, unit_sphere

D = 16


def make(seed: int = 0, **cfg) -> mixers.Mixer:
    torch.manual_seed(seed)
    opts = {"n_heads": 4, "n_clusters": 3, "window": 4, "cluster_window": 3, **cfg}
    return mixers.build("routing", d_model=D, **opts).double().eval()


def run_chunks(m: mixers.Mixer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, i = None, [], 0
    for n in sizes:
        y, state = m(x[:, i : i + n], state=state)
        outs.append(y)
        i += n
    return torch.cat(outs, dim=1)


def allowed_keys(cluster: list[int], i: int, w: int | None) -> list[int]:
    """Keys a routing query i may read: earlier tokens of its cluster, the last w of them (itself
    included); itself only when it is alone."""
    same = [j for j in range(i + 1) if cluster[j] == cluster[i]]
    if w is not None:
        same = same[-w:]
    return [j for j in same if j != i] or [i]


def reference(m: mixers.Mixer, x: torch.Tensor) -> torch.Tensor:
    """Every head, every query, written out with the allowed keys listed explicitly."""
    from memlab.mixers.rope import rotary

    b, t, _ = x.shape
    hr, hl, hd = m.n_route, m.n_local, m.head_dim
    proj = m.in_proj(x).view(b, t, 2 * hr + 3 * hl, hd).transpose(1, 2)
    shared, rv = proj[:, :hr], proj[:, hr : 2 * hr]
    lq, lk, lv = proj[:, 2 * hr :].split(hl, dim=1)
    pos = torch.arange(t)
    s, lq, lk = rotary(shared, pos), rotary(lq, pos), rotary(lk, pos)
    cluster = torch.einsum("bhtd,hcd->bhtc", unit_sphere(shared), m.centroids).argmax(-1)
    out = torch.zeros(b, hr + hl, t, hd, dtype=x.dtype)
    for bi in range(b):
        for h in range(hr):
            for i in range(t):
                keys = allowed_keys(cluster[bi, h].tolist(), i, m.config.cluster_window)
                sc = torch.stack([s[bi, h, i] @ s[bi, h, j] for j in keys]) / math.sqrt(hd)
                out[bi, h, i] = torch.softmax(sc, 0) @ rv[bi, h, keys]
        for h in range(hl):
            for i in range(t):
                keys = list(range(max(0, i - m.config.window + 1), i + 1))
                sc = torch.stack([lq[bi, h, i] @ lk[bi, h, j] for j in keys]) / math.sqrt(hd)
                out[bi, hr + h, i] = torch.softmax(sc, 0) @ lv[bi, h, keys]
    return m.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("cluster_window", [3, None])
def test_matches_explicit_cluster_and_window_rule(cluster_window: int | None) -> None:
    m = make(cluster_window=cluster_window)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        torch.testing.assert_close(y, reference(m, x), atol=1e-10, rtol=0)
        torch.testing.assert_close(run_chunks(m, x, [1] * 19), y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("with_cache", [False, True])
def test_routing_query_reads_only_its_cluster(with_cache: bool) -> None:
    """The Jacobian of each routing output with respect to the values is nonzero exactly on the
    allowed keys, for the sorted (training) path and for the cached (decoding) path."""
    m = make(n_clusters=3, cluster_window=4)
    torch.manual_seed(3)
    t, d = 22, m.head_dim
    s = torch.randn(1, 2, t, d, dtype=torch.float64)
    v = torch.randn(1, 2, t, d, dtype=torch.float64, requires_grad=True)
    cluster = torch.randint(0, 3, (1, 2, t))
    rank = F.one_hot(cluster, 3).cumsum(2).gather(-1, cluster[..., None])[..., 0]
    n_old = 9 if with_cache else 0
    state = m.init_state(1, "cpu", torch.float64)
    if with_cache:
        old = {"rk": s, "rv": v, "cluster": cluster, "rank": rank}
        state.update({name: value[:, :, :n_old] for name, value in old.items()})
    out = m.route_attend(s[:, :, n_old:], v[:, :, n_old:], cluster[:, :, n_old:], rank[:, :, n_old:], state)
    for h in range(2):
        for i in range(n_old, t):
            (grad,) = torch.autograd.grad(out[0, h, i - n_old].sum(), v, retain_graph=True)
            reads = set(torch.nonzero(grad[0, h].abs().sum(-1)).flatten().tolist())
            assert reads == set(allowed_keys(cluster[0, h].tolist(), i, 4)), (h, i)
            assert all(cluster[0, h, j] == cluster[0, h, i] for j in reads)
            assert not grad[0, 1 - h].any()


def test_centroids_initialised_from_data_then_ema() -> None:
    m = make(n_clusters=4, decay=0.9).train()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    hr, hd = m.n_route, m.head_dim
    with torch.no_grad():
        shared = m.in_proj(x).view(2, 12, -1, hd).transpose(1, 2)[:, :hr]
        unit = F.normalize(unit_sphere(shared), dim=-1)
        m2 = make(n_clusters=4, decay=0.9).train()
        torch.manual_seed(7)
        m(x)  # first training pass: initialise from the batch, then one EMA step
        torch.manual_seed(7)
        m2._init_centroids(shared)  # the same draw, without the EMA step
        init = m2.centroids.clone()
    for h in range(hr):  # every initial centroid is one of the batch's normalised vectors
        sims = torch.einsum("cd,btd->cbt", init[h], unit[:, h]).flatten(1).max(-1).values
        torch.testing.assert_close(sims, torch.ones_like(sims), atol=1e-12, rtol=0)
    # one EMA step from the initial centroids, written out cluster by cluster
    a = torch.einsum("bhtd,hcd->bhtc", unit_sphere(shared), init).argmax(-1)
    expect = init.clone()
    for h in range(hr):
        for c in range(4):
            members = unit_sphere(shared)[:, h][a[:, h] == c]
            if len(members):
                expect[h, c] = F.normalize(0.9 * init[h, c] + 0.1 * members.mean(0), dim=0)
    torch.testing.assert_close(m.centroids, expect, atol=1e-12, rtol=0)
    assert bool(m.initialized)


def test_ema_update_formula_on_known_centroids() -> None:
    m = make(n_clusters=3, decay=0.75).train()
    m.initialized.fill_(True)
    start = m.centroids.clone()
    x = torch.randn(1, 10, D, dtype=torch.float64)
    with torch.no_grad():
        shared = m.in_proj(x).view(1, 10, -1, m.head_dim).transpose(1, 2)[:, : m.n_route]
        a = m.assign(shared)
        m(x)
    u = unit_sphere(shared)
    for h in range(m.n_route):
        for c in range(3):
            sel = a[0, h] == c
            if sel.any():
                want = 0.75 * start[h, c] + 0.25 * u[0, h, sel].mean(0)
                torch.testing.assert_close(m.centroids[h, c], want / want.norm(), atol=1e-12, rtol=0)
            else:
                torch.testing.assert_close(m.centroids[h, c], start[h, c], atol=0, rtol=0)
    assert (m.centroids - start).abs().max() > 1e-3


def test_eval_mode_keeps_centroids_fixed() -> None:
    m = make()
    before = m.centroids.clone()
    with torch.no_grad():
        m(torch.randn(2, 30, D, dtype=torch.float64))
    assert torch.equal(m.centroids, before) and not bool(m.initialized)


def test_too_many_clusters_for_first_batch() -> None:
    m = make(n_clusters=12).train()
    with pytest.raises(ValueError, match="n_clusters=12"):
        m(torch.randn(2, 8, D, dtype=torch.float64))


@pytest.mark.parametrize("cfg", [{"n_routing_heads": 4}, {"cluster_window": None, "n_routing_heads": 1}])
def test_forward_equals_chunked_and_decode(cfg: dict) -> None:
    m = make(**cfg)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        torch.testing.assert_close(run_chunks(m, x, [5, 1, 9, 8]), full, atol=1e-10, rtol=0)
        torch.testing.assert_close(run_chunks(m, x, [1] * 23), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("prefix, window", [(0, 3), (4, 3), (2, 7), (0, 40)])
def test_banded_attention_matches_masked_dense(prefix: int, window: int) -> None:
    torch.manual_seed(prefix + window)
    t = 13
    q = torch.randn(2, 3, t, 8, dtype=torch.float64)
    k = torch.randn(2, 3, prefix + t, 8, dtype=torch.float64)
    v = torch.randn(2, 3, prefix + t, 8, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 3, prefix + t))
    qi = prefix + torch.arange(t)[:, None]
    kj = torch.arange(prefix + t)[None, :]
    for lab in (None, labels):
        ok = (kj <= qi) & (qi - kj < window)
        if lab is not None:
            ok = ok & (lab[:, :, prefix:, None] == lab[:, :, None, :])
        sc = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(qi == kj, SELF_SCORE)
        want = torch.softmax(sc.masked_fill(~ok, float("-inf")), -1) @ v
        ql = None if lab is None else lab[:, :, prefix:]
        got = banded_attention(q, k, v, window, ql, lab, self_score=SELF_SCORE)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"window": 0}, "window"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"cluster_window": 0}, "cluster_window"),
        ({"n_heads": 3}, "n_heads"),
        ({"n_routing_heads": 5}, "n_routing_heads"),
        ({"n_routing_heads": 0}, "n_routing_heads"),
        ({"decay": 1.0}, "decay"),
    ],
)
def test_config_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixers.build("routing", d_model=D, **cfg)
