"""The memory mixers are launch-bound on a GPU at batch 1: every aten op in the chunk loop is a
kernel launch per chunk. This pins the per-chunk op count of a titans_mac forward so that a
regression (an op moved back into the loop) shows up. Measured: 888 profiler events per chunk
before the chunk loop was trimmed, 402 after; the dispatch-level count below is a subset."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memlab import mixers

# Dispatch-level aten ops per 64-token chunk of a titans_mac forward (d_model 128, 2 heads):
# 342 before the trimming, 168 after, 174 later; 189 with the three RMSNorms of the memory's
# reads and of y (stability, see titans.py); the bound leaves a ~5% margin.
MAX_OPS_PER_CHUNK = 200


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(m: mixers.Mixer, t: int) -> int:
    x = torch.randn(1, t, 128)
    with torch.no_grad(), _Count() as c:
        m(x)
    return c.n


def test_titans_mac_ops_per_chunk_bounded() -> None:
    torch.manual_seed(0)
    m = mixers.build("titans_mac", d_model=128, n_heads=2, chunk_size=64).eval()
    per_chunk = (_ops(m, 64 * 6) - _ops(m, 64 * 2)) / 4  # the ops outside the chunk loop cancel
    assert per_chunk <= MAX_OPS_PER_CHUNK, f"{per_chunk} aten ops per chunk (bound {MAX_OPS_PER_CHUNK})"


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag"])
def test_compiled_memory_is_the_same_function(name: str) -> None:
    """``mem_compile`` runs the chunk (MAC: segment) step through torch.compile: outputs, state,
    the next decoded token and every gradient equal the eager form's. MAC compiles its own
    segment step; MAG (like MAL and the Miras models) compiles the shared ``chunk_step``."""
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_heads": 2, "chunk_size": 8}
    eager = mixers.build(name, **cfg).train()
    comp = mixers.build(name, **cfg, mem_compile=True).train()
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(2, 8 * 3 + 5, 32)  # three whole chunks through the loop, then a partial one
    nxt = torch.randn(2, 1, 32)
    results = []
    for m in (eager, comp):
        xi = x.clone().requires_grad_(True)
        y, st = m(xi)
        y_next, _ = m(nxt, state=st)
        (y.square().sum() + y_next.square().sum()).backward()
        grads = [p.grad.clone() for p in m.parameters()]
        results.append((y.detach(), st, y_next.detach(), xi.grad, grads))
    (y0, st0, n0, gx0, gp0), (y1, st1, n1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-6)
    for key, val in st0.items():
        if isinstance(val, torch.Tensor):
            torch.testing.assert_close(st1[key], val, rtol=1e-5, atol=1e-6, msg=f"state {key}")
        else:
            assert st1[key] == val
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    for (pname, _), a, b in zip(eager.named_parameters(), gp0, gp1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"gradient of {pname}")


def test_compiled_memory_stays_compiled_across_mixers_and_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mem_compile`` in mixed use: every compiled memory mixer of one process, trained at
    several lengths (a partial last chunk included) and batch sizes, then run without gradients
    and decoded, stays within a few graphs per compiled function, so dynamo never falls back to
    eager (one shared compiled ``chunk_step`` hit the recompile limit of 8: its graphs multiplied
    with the objectives, None arguments, grad modes and lengths), and computes what eager does.

    The limit is lowered to 4 here and made an error. The backend is ``aot_eager``: recompiles
    are decided by dynamo's guards, before the backend, and inductor's codegen would take minutes
    on a CPU; ``test_compiled_memory_is_the_same_function`` covers inductor.
    """
    import torch._dynamo

    from memlab.mixers import neural_memory

    monkeypatch.setattr(neural_memory, "_COMPILED", {})  # fresh compiled copies, with this backend
    plain_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: plain_compile(fn, backend="aot_eager", **kw))
    torch.manual_seed(0)
    cfg = {"d_model": 16, "n_heads": 2, "chunk_size": 4, "mem_expansion": 2}
    specs = [
        ("titans_mac", {}), ("titans_mag", {"window": 8}), ("titans_mal", {"window": 8}),
        ("moneta", {}), ("yaad", {}), ("memora", {}), ("moneta", {"mem_depth": 1}),
    ]  # fmt: skip
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        for name, extra in specs:
            eager = mixers.build(name, **cfg, **extra)
            comp = mixers.build(name, **cfg, **extra, mem_compile=True)
            comp.load_state_dict(eager.state_dict())
            for b, t in ((2, 4 * 3 + 1), (2, 4 * 6), (3, 4 * 6)):  # training steps: lengths, batch sizes
                x = torch.randn(b, t, 16)
                ys = []
                for m in (eager, comp):
                    xi = x.clone().requires_grad_(True)
                    y, _ = m.train()(xi)
                    y.square().sum().backward()
                    ys.append((y.detach(), xi.grad))
                msg = f"{name} {extra} B={b} T={t}"
                torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-5, msg=msg)
            x, steps = torch.randn(1, 4 * 2 + 3, 16), torch.randn(1, 5, 16)
            outs = []
            for m in (eager, comp):  # without gradients, then token by token across a chunk boundary
                with torch.no_grad():
                    y, st = m.eval()(x)
                    ys = [y]
                    for i in range(steps.shape[1]):
                        y, st = m(steps[:, i : i + 1], state=st)
                        ys.append(y)
                    ys.append(m(x, state=st)[0])
                outs.append(torch.cat(ys, dim=1))
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5, msg=f"{name} {extra} eval")
