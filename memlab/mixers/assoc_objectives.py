"""The two objective choices of the associative memory (Miras): attentional biases and retention.

- attentional bias, the per-token loss(M(k), v) written through the error e = M(k) - v:
  ``LpBias`` (``||e||_p^p``; p = 2 is Titans' ``||M(k) - v||^2``), ``HuberBias`` (Yaad);
- retention, how the weights W are read from the accumulator A that the updates add to:
  ``DecayRetention`` (Titans / Yaad weight decay), ``LqRetention`` (Moneta's l_q stability, W the
  mirror map of A), ``KLRetention`` (Memora: weights on the probability simplex).

``memlab.mixers.assoc_memory`` runs the memory that these objectives define.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# Attentional biases: the per-token objective loss(M(k), v), written through the error e = M(k) - v.


class AttentionalBias:
    """A per-token objective of the error e (..., D); ``n_extra`` data-dependent scalars per token."""

    name = ""
    n_extra = 0

    def loss(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """e: (..., D) -> (...,) the loss of each token."""
        raise NotImplementedError

    def grad(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """e: (..., D) -> (..., D) d loss / d M(k), written in closed form."""
        raise NotImplementedError

    def scaled_grad(self, e: torch.Tensor, extra: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``scale * grad(e, extra)``; subclasses fold the scale into their constants."""
        return scale * self.grad(e, extra)


class LpBias(AttentionalBias):
    """``||e||_p^p`` (Miras eq. 10); p=2 is the L2 regression of Titans.

    The gradient is ``p |e|^(p-1) sign(e)``. For p < 2 it is not smooth at 0, so, as Miras
    suggests, ``|e|`` is replaced by ``sqrt(e^2 + eps)`` (the loss becomes ``(e^2 + eps)^(p/2)``,
    whose gradient is ``p e (e^2 + eps)^(p/2 - 1)``); p >= 2 uses the exact form.
    """

    name = "lp"

    def __init__(self, p: float = 2.0, eps: float = 1e-6) -> None:
        if not p >= 1:
            raise ValueError(f"LpBias: p must be >= 1, got {p!r}")
        self.p, self.eps = float(p), float(eps)

    def loss(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if self.p >= 2:
            return e.abs().pow(self.p).sum(-1)
        return (e * e + self.eps).pow(self.p / 2).sum(-1)

    def grad(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if self.p == 2:
            return 2 * e
        if self.p > 2:
            return self.p * e * e.abs().pow(self.p - 2)
        return self.p * e * (e * e + self.eps).pow(self.p / 2 - 1)

    def scaled_grad(self, e: torch.Tensor, extra: torch.Tensor | None, scale: float) -> torch.Tensor:
        c = scale * self.p
        if self.p == 2:
            return c * e
        if self.p == 3:
            return c * (e * e.abs())
        if self.p > 2:
            return c * (e * e.abs().pow(self.p - 2))
        return c * (e * (e * e + self.eps).pow(self.p / 2 - 1))


class HuberBias(AttentionalBias):
    """Yaad's Huber-type objective (Miras eq. 16) with a data-dependent threshold delta_t.

    ``1/2 ||e||_2^2`` while ``||e||_2 <= delta_t`` (gradient e), else ``delta_t ||e||_1``
    (gradient ``delta_t sign(e)``): small errors are fitted, large ones (outliers) move the
    memory by a bounded amount.
    """

    name = "huber"
    n_extra = 1

    def _small(self, e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(e, dim=-1) <= delta

    def loss(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        delta = extra[..., 0]
        return torch.where(self._small(e, delta), 0.5 * (e * e).sum(-1), delta * e.abs().sum(-1))

    def grad(self, e: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        delta = extra[..., 0]
        small = self._small(e, delta)[..., None]
        return torch.where(small, e, delta[..., None] * torch.sign(e))


# ---------------------------------------------------------------------------------------------
# Retention: how the weights are read from the accumulator (all retention recurrences are linear
# in the accumulator, see the module docstring).


class Retention:
    """Maps an accumulator (..., Din, Dout) to memory weights of the same shape."""

    name = ""

    def weights(self, acc: torch.Tensor) -> torch.Tensor:
        return acc

    def renormalize(self, acc: torch.Tensor) -> torch.Tensor:
        """A representative of acc with the same weights (keeps the accumulator bounded)."""
        return acc

    def init_accumulator(self, w0: torch.Tensor) -> torch.Tensor:
        """The learned initial accumulator, given random weights w0 scaled like 1/sqrt(Din)."""
        return w0


class DecayRetention(Retention):
    """Weight decay / forget gate (Titans, Yaad): W_t = a_t W_{t-1} + update; the weights are A."""

    name = "decay"


class LqRetention(Retention):
    """Moneta's l_q memory stability: the retention ``1/2 ||W||_q^2`` in the FTRL form.

    The accumulator A sums the (decayed) gradient steps and the weights are the mirror map of
    the regulariser's conjugate ``1/2 ||A||_p^2`` (``p = q / (q - 1)``):
    ``W = sign(A) |A|^(p-1) / ||A||_p^(p-2)``, elementwise powers, one norm per layer matrix.
    q = 2 gives W = A (plain weight decay); q > 2 compresses large entries. The map is
    homogeneous of degree 1, so a decaying A shrinks W. (Miras writes the normalisation as
    ``A / ||A||^(q-2)``; that form is singular as A decays to 0, and blew up in training.)
    ``|A|^(p-2)`` is smoothed as ``(A^2 + eps)^((p-2)/2)`` so that its slope stays finite at 0.

    ``normalized`` scales the regulariser to ``c/2 ||W||_q^2`` with ``c = n^(1 - 2/q)`` (n entries
    of the matrix), i.e. ``n/2 (mean |W|^q)^(2/q)``, which is ``1/2 ||W||_2^2`` at q = 2 and has a
    Hessian of O(1) for weights of any size; it divides W by c. Unnormalised, the map's gain
    dW/dA ~ ||W||_q^(q-2) / ((q-1) |W|^(q-2)) grows like sqrt(n) at q = 4: ~74 for a 64 x 256
    memory layer at init, so every step in A moved W tens of times lr_max, and the outer
    gradient exploded (4e11 over 2048 tokens).
    """

    name = "lq"

    def __init__(self, q: float = 4.0, eps: float = 1e-6, normalized: bool = True) -> None:
        if not q > 1:
            raise ValueError(f"LqRetention: q must be > 1, got {q!r}")
        self.q, self.p, self.eps = float(q), float(q) / (float(q) - 1.0), float(eps)
        self.normalized = bool(normalized)

    def _scale(self, acc: torch.Tensor) -> float:
        """c in the regulariser ``c/2 ||W||_q^2``: n^(1 - 2/q) normalised (n entries), else 1."""
        return (acc.shape[-2] * acc.shape[-1]) ** (1.0 - 2.0 / self.q) if self.normalized else 1.0

    def weights(self, acc: torch.Tensor) -> torch.Tensor:
        if self.q == 2:
            return acc
        p = self.p
        norm = torch.linalg.vector_norm(acc, ord=p, dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        return acc * (acc * acc + self.eps).pow((p - 2) / 2) * norm.pow(2 - p) / self._scale(acc)

    def init_accumulator(self, w0: torch.Tensor) -> torch.Tensor:
        # the gradient of c/2 ||W||_q^2 at w0, the inverse of ``weights``: the memory starts at w0
        if self.q == 2:
            return w0
        q = self.q
        norm = torch.linalg.vector_norm(w0, ord=q, dim=(-2, -1), keepdim=True)
        return torch.sign(w0) * w0.abs().pow(q - 1) * norm.pow(2 - q) * self._scale(w0)


class KLRetention(Retention):
    """Memora's KL retention: ``W_t = c softmax(a_t log W_{t-1} - eta_t grad)`` (Miras eq. 27).

    Every column (the input weights of one output unit) lies on the simplex scaled by ``c``.
    The accumulator holds the log-weights; softmax ignores a per-column shift, so the recurrence
    on the logits is linear and the chunked closed form is exact.
    """

    name = "kl"

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"KLRetention: scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def weights(self, acc: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.softmax(acc, dim=-2)

    def renormalize(self, acc: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(acc, dim=-2)

    def init_accumulator(self, w0: torch.Tensor) -> torch.Tensor:
        # Random log-weights (not uniform): identical columns would receive identical updates
        # forever and the hidden units could never differ.
        return torch.log_softmax(w0 * math.sqrt(w0.shape[-2]), dim=-2)
