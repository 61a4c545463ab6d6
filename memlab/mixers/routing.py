"""Routing Transformer (Roy, Saffar, Vaswani & Grangier, 2020): content-based sparse attention by
online k-means, plus local attention.

Heads come in two kinds (the paper gives half of them to each):

- routing heads: one shared projection gives each token a vector that serves as both its query
  and its key (Q = K, as in the paper). The vector is layer-normalised without scale or bias and
  divided by sqrt(D), so it lies on the unit sphere, and is assigned to the nearest of
  ``n_clusters`` centroids (largest dot product). A query attends only to past keys of its own
  cluster: with ``cluster_window`` set, to the most recent ``cluster_window`` tokens of that
  cluster (itself included); with None, to all of them. Because q_i = k_i, a token's score with
  itself would dominate, so it is replaced by a large negative constant: a token attends to
  itself only when its cluster holds no earlier token.
- local heads: ordinary softmax attention over the keys in (t - window, t].

Centroids (``n_clusters`` unit vectors per routing head) are a buffer, not a parameter. On the
first forward pass in training mode they are initialised from the data (the normalised vectors
of n_clusters distinct positions; n_clusters must not exceed the sequence length). After every
training forward pass, each centroid that received vectors moves by exponential moving average
towards their mean and is renormalised to the unit sphere::

    mu_c <- normalise(decay * mu_c + (1 - decay) * mean_{i: a_i = c} x_i)

(the paper writes the update with sums over the assigned queries and keys; with Q = K and the
mean it does not depend on the batch size). In eval mode the centroids are fixed, so the full
forward, chunked calls and token-by-token decoding compute the same function.

Training form: the routing heads sort the tokens by (cluster, position), so that each cluster
is a contiguous run and "the most recent w tokens of my cluster" is a band of width w in sorted
order; the band is computed in blocks (``banded_attention``), O(T * w) memory, O(n^1.5 d) time
with w ~ n / n_clusters ~ sqrt(n). Local heads use the same banded routine in time order.
Calls with a cache attend to it directly (each query scores the cached keys, masked).

State (grows with T): routing heads keep every cached shared vector (rotated), value, cluster
id and rank within its cluster, and the per-cluster token counts; local heads keep the last
window - 1 keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlab.mixers.base import Mixer, MixerConfig, State, check_divides, check_positive, register
from memlab.mixers.rope import rotary

SELF_SCORE = -5e4  # score of a routing query with its own key: used only when nothing else is allowed


@dataclass(kw_only=True)
class RoutingConfig(MixerConfig):
    n_heads: int = 4
    n_routing_heads: int | None = None  # None: half of the heads (the paper's split)
    n_clusters: int = 16  # k-means centroids per routing head; ~ sqrt(sequence length)
    window: int = 64  # local heads: a query at t sees keys in (t - window, t]
    cluster_window: int | None = 128  # routing heads: most recent tokens of the cluster; None: all
    decay: float = 0.999  # EMA decay of the centroids (the paper's lambda)
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_routing_heads is None:
            self.n_routing_heads = self.n_heads // 2
        check_positive(self, "n_heads", "n_clusters", "window")
        check_divides(self, "n_heads", "d_model")
        nr = self.n_routing_heads  # bool is an int subclass; True is not a head count
        if not isinstance(nr, int) or isinstance(nr, bool) or not 1 <= nr <= self.n_heads:
            raise ValueError(
                f"RoutingConfig.n_routing_heads must be in [1, n_heads={self.n_heads}], "
                f"got {self.n_routing_heads!r}"
            )
        if self.cluster_window is not None:
            check_positive(self, "cluster_window")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"RoutingConfig.decay must be in [0, 1), got {self.decay!r}")
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"RoutingConfig: rope needs an even head dim, got {self.d_model // self.n_heads}"
            )


def unit_sphere(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without scale or bias, divided by sqrt(D): (..., D) vectors of norm ~1."""
    return F.layer_norm(x, x.shape[-1:]) / math.sqrt(x.shape[-1])


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    q_labels: torch.Tensor | None = None,
    k_labels: torch.Tensor | None = None,
    self_score: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over the ``window`` keys ending at its own index.

    q: (B, H, T, D); k, v: (B, H, S, D) with S >= T, query i aligned with key S - T + i. Key j is
    allowed for query i when 0 <= (S - T + i) - j < window and, if labels are given
    (q_labels (B, H, T), k_labels (B, H, S) ints), when the labels are equal. ``self_score``
    replaces the score of key S - T + i (the query's own key). Returns (B, H, T, D).

    Queries go in blocks of C = min(window, T); a block sees the C + window - 1 keys ending at
    its last query, so memory is O(T * window) rather than O(T * S).
    """
    b, h, t, d = q.shape
    s_len = k.shape[2]
    prefix = s_len - t
    c = min(window, t)
    n_blocks = -(-t // c)
    span = c + window - 1
    # pad keys on the left (window - 1, before index 0) and on the right (to fill the last block)
    right = n_blocks * c - t
    kp = F.pad(k, (0, 0, window - 1, right))
    vp = F.pad(v, (0, 0, window - 1, right))
    # block n's keys: padded indices prefix + n*c .. prefix + n*c + span - 1
    kb = kp[:, :, prefix:].unfold(2, span, c).transpose(-1, -2)  # (B, H, n, span, D)
    vb = vp[:, :, prefix:].unfold(2, span, c).transpose(-1, -2)
    qb = F.pad(q, (0, 0, 0, right)).view(b, h, n_blocks, c, d)
    scores = torch.einsum("bhnid,bhnjd->bhnij", qb, kb) / math.sqrt(d)
    # query i = n*c + r, key slot l is key index prefix + n*c - window + 1 + l: its distance back
    # from the query's own key is r + window - 1 - l
    r = torch.arange(c, device=q.device)[:, None]
    slot = torch.arange(span, device=q.device)[None, :]
    back = r + window - 1 - slot  # (c, span)
    key_index = prefix + torch.arange(n_blocks, device=q.device)[:, None, None] * c - window + 1 + slot
    allowed = (back >= 0) & (back < window) & (key_index >= 0) & (key_index < s_len)  # (n, c, span)
    allowed = allowed.expand(b, h, n_blocks, c, span)
    if q_labels is not None and k_labels is not None:
        lp = F.pad(k_labels, (window - 1, right), value=-1)[:, :, prefix:].unfold(2, span, c)
        ql = F.pad(q_labels, (0, right), value=-2).view(b, h, n_blocks, c)
        allowed = allowed & (ql[..., :, None] == lp[..., None, :])
    # padding queries (past T) keep their own (zero) key so that no softmax row is empty: an
    # all -inf row would give NaN, and NaN * 0 still poisons the gradients of the real rows
    q_index = torch.arange(n_blocks, device=q.device)[:, None, None] * c + r[None]  # (n, c, 1)
    allowed = allowed | ((q_index >= t) & (back == 0))
    if self_score is not None:
        scores = scores.masked_fill((back == 0).expand_as(scores), self_score)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhnij,bhnjd->bhnid", torch.softmax(scores, -1), vb)
    return out.reshape(b, h, n_blocks * c, d)[:, :, :t]


@register("routing")
class Routing(Mixer):
    """Routing attention (online k-means clusters, Q = K) on half the heads, local attention on the rest."""

    Config = RoutingConfig
    constant_state = False
    test_config = {"n_heads": 4, "n_clusters": 3, "window": 4, "cluster_window": 3}

    def __init__(self, config: RoutingConfig) -> None:
        super().__init__(config)
        c = config
        self.n_heads = c.n_heads
        self.head_dim = c.d_model // c.n_heads
        self.n_route = c.n_routing_heads
        self.n_local = c.n_heads - c.n_routing_heads
        hd = self.head_dim
        # routing heads: shared q/k and v; local heads: q, k, v
        self.in_proj = nn.Linear(c.d_model, (2 * self.n_route + 3 * self.n_local) * hd, bias=c.bias)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        centroids = F.normalize(torch.randn(self.n_route, c.n_clusters, hd), dim=-1)
        self.register_buffer("centroids", centroids)
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False  # avoids reading the buffer (a device sync) once it is True

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> State:
        def empty(h: int) -> torch.Tensor:
            return torch.zeros(batch_size, h, 0, self.head_dim, device=device, dtype=dtype)

        ints = torch.zeros(batch_size, self.n_route, 0, dtype=torch.long, device=device)
        n_clusters = self.config.n_clusters
        counts = torch.zeros(batch_size, self.n_route, n_clusters, dtype=torch.long, device=device)
        return {
            "rk": empty(self.n_route), "rv": empty(self.n_route), "cluster": ints, "rank": ints.clone(),
            "counts": counts, "lk": empty(self.n_local), "lv": empty(self.n_local), "pos": 0,
        }  # fmt: skip

    def assign(self, shared: torch.Tensor) -> torch.Tensor:
        """shared: (B, Hr, T, D) routing vectors -> (B, Hr, T) index of the nearest centroid."""
        return torch.einsum("bhtd,hcd->bhtc", unit_sphere(shared), self.centroids.to(shared.dtype)).argmax(-1)

    @torch.no_grad()
    def _init_centroids(self, shared: torch.Tensor) -> None:
        b, _, t, _ = shared.shape
        k = self.config.n_clusters
        if k > t:
            raise ValueError(
                f"RoutingConfig.n_clusters={k} is above the sequence length T={t} of the first "
                "training batch, which initialises the centroids"
            )
        unit = unit_sphere(shared.to(self.centroids.dtype))
        for h in range(self.n_route):
            pos = torch.randperm(t, device=shared.device)[:k]
            rows = torch.randint(0, b, (k,), device=shared.device)
            self.centroids[h] = F.normalize(unit[rows, h, pos], dim=-1)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, shared: torch.Tensor, cluster: torch.Tensor) -> None:
        """Move each centroid that received vectors towards their mean (see the module docstring).

        shared: (B, Hr, T, D) routing vectors; cluster: (B, Hr, T) their assignments.
        """
        unit = unit_sphere(shared.to(self.centroids.dtype))  # accumulate in the buffer's precision
        onehot = F.one_hot(cluster, self.config.n_clusters).to(unit.dtype)  # (B, Hr, T, K)
        sums = torch.einsum("bhtc,bhtd->hcd", onehot, unit)
        counts = onehot.sum(dim=(0, 2))  # (Hr, K)
        mean = sums / counts.clamp(min=1)[..., None]
        decay = self.config.decay
        moved = F.normalize(decay * self.centroids + (1 - decay) * mean, dim=-1)
        self.centroids.copy_(torch.where(counts[..., None] > 0, moved, self.centroids))

    def _rotate(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        if not self.config.rope:
            return x
        return rotary(x, torch.arange(pos0, pos0 + x.shape[2], device=x.device), self.config.rope_base)

    def route_attend(
        self,
        s: torch.Tensor,
        v: torch.Tensor,
        cluster: torch.Tensor,
        rank: torch.Tensor,
        state: State,
    ) -> torch.Tensor:
        """Routing-head attention for the new tokens.

        s: (B, Hr, T, D) rotated shared query/key vectors; v: (B, Hr, T, D); cluster, rank:
        (B, Hr, T) cluster ids and 1-based ranks within the cluster (counting cached tokens).
        Returns (B, Hr, T, D).
        """
        b, h, t, d = s.shape
        w = self.config.cluster_window
        if state["rk"].shape[2] == 0:
            # no cache: sort by (cluster, position); cluster runs become contiguous, and the last w
            # tokens of the cluster are a band of width w in sorted order
            order = torch.argsort(cluster * t + torch.arange(t, device=s.device), dim=-1)
            gather = order[..., None].expand(b, h, t, d)
            s_sorted, v_sorted = s.gather(2, gather), v.gather(2, gather)
            c_sorted = cluster.gather(2, order)
            out = banded_attention(
                s_sorted, s_sorted, v_sorted, w or t, c_sorted, c_sorted, self_score=SELF_SCORE
            )
            return torch.empty_like(out).scatter_(2, gather, out)
        keys = torch.cat([state["rk"], s], dim=2)
        values = torch.cat([state["rv"], v], dim=2)
        k_cluster = torch.cat([state["cluster"], cluster], dim=2)
        k_rank = torch.cat([state["rank"], rank], dim=2)
        n_cached = state["rk"].shape[2]
        k_index = torch.arange(keys.shape[2], device=s.device)
        q_index = n_cached + torch.arange(t, device=s.device)
        scores = s @ keys.transpose(-1, -2) / math.sqrt(d)  # (B, Hr, T, S)
        scores = scores.masked_fill(q_index[:, None] == k_index[None, :], SELF_SCORE)
        allowed = (k_cluster[:, :, None, :] == cluster[..., None]) & (k_index[None, :] <= q_index[:, None])
        if w is not None:
            allowed = allowed & (rank[..., None] - k_rank[:, :, None, :] < w)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values

    def forward(self, x: torch.Tensor, *, state: State | None = None) -> tuple[torch.Tensor, State]:
        self.check_input(x)
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        pos0, hr, hl, hd = state["pos"], self.n_route, self.n_local, self.head_dim
        proj = self.in_proj(x).view(b, t, 2 * hr + 3 * hl, hd).transpose(1, 2)  # (B, heads*, T, D)
        shared, rv = proj[:, :hr], proj[:, hr : 2 * hr]
        lq, lk, lv = proj[:, 2 * hr :].split(hl, dim=1) if hl else (proj[:, :0],) * 3
        if self.training and not self._seen_initialized:
            if not bool(self.initialized):
                self._init_centroids(shared)
            self._seen_initialized = True
        cluster = self.assign(shared)  # (B, Hr, T)
        onehot = F.one_hot(cluster, self.config.n_clusters)
        counts = state["counts"] + onehot.sum(2)
        # rank: how many tokens of the same cluster up to and including this one (cache included)
        rank = (state["counts"][:, :, None, :] + onehot.cumsum(2)).gather(-1, cluster[..., None])[..., 0]
        s = self._rotate(shared, pos0)
        o_route = self.route_attend(s, rv, cluster, rank, state)
        outs = [o_route]
        new_state: State = {
            "rk": torch.cat([state["rk"], s], dim=2), "rv": torch.cat([state["rv"], rv], dim=2),
            "cluster": torch.cat([state["cluster"], cluster], dim=2),
            "rank": torch.cat([state["rank"], rank], dim=2), "counts": counts, "pos": pos0 + t,
        }  # fmt: skip
        if hl:
            lq, lk = self._rotate(lq, pos0), self._rotate(lk, pos0)
            k_all = torch.cat([state["lk"], lk], dim=2)
            v_all = torch.cat([state["lv"], lv], dim=2)
            outs.append(banded_attention(lq, k_all, v_all, self.config.window))
            keep = self.config.window - 1
            new_state["lk"] = k_all[:, :, max(k_all.shape[2] - keep, 0) :]
            new_state["lv"] = v_all[:, :, max(v_all.shape[2] - keep, 0) :]
        else:
            new_state["lk"], new_state["lv"] = state["lk"], state["lv"]
        if self.training:
            self.ema_update(shared, cluster)
        o = torch.cat(outs, dim=1).transpose(1, 2).reshape(b, t, self.d_model)
        return self.o_proj(o), new_state
