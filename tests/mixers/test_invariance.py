"""The contract every registered mixer meets; new mixers join this matrix automatically.

All checks run in float64 so that differences come from the algorithm, not rounding:
- full forward == chunked forward with state passing == token-by-token decoding (atol 1e-8);
- causality: changing token t never changes outputs before t;
- gradients exist and are finite for every parameter that takes part;
- state bytes are measured from the state tensors; constant for recurrent mixers.
"""

from __future__ import annotations

import pytest
import torch

from memlab import mixers

D_MODEL = 32
ATOL = 1e-8  # float64: anything larger than accumulated rounding means a real mismatch


def make(name: str, seed: int = 0) -> mixers.Mixer:
    torch.manual_seed(seed)
    cls = mixers.MIXERS.get(name)
    m = mixers.build(name, d_model=D_MODEL, **cls.test_config).double().eval()
    return m


def run_chunks(m: mixers.Mixer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, i = None, [], 0
    for n in sizes:
        y, state = m(x[:, i : i + n], state=state)
        outs.append(y)
        i += n
    assert i == x.shape[1]
    return torch.cat(outs, dim=1)


NAMES = mixers.names()


@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_chunked_and_decode(name: str) -> None:
    m = make(name)
    torch.manual_seed(1)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        chunked = run_chunks(m, x, [5, 1, 9, 8])
        decoded = run_chunks(m, x, [1] * 23)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, full, atol=ATOL, rtol=0)
    assert full.abs().max() > 1e-6, "output is identically zero"


@pytest.mark.parametrize("name", NAMES)
def test_explicit_init_state_matches_none(name: str) -> None:
    m = make(name)
    x = torch.randn(3, 11, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(x, state=m.init_state(3, x.device, x.dtype))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_causal(name: str) -> None:
    m = make(name)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y0, _ = m(x)
        for t in (0, 7, 18):
            x2 = x.clone()
            x2[:, t] += torch.randn(2, D_MODEL, dtype=torch.float64)
            y1, _ = m(x2)
            torch.testing.assert_close(y1[:, :t], y0[:, :t], atol=ATOL, rtol=0)
            assert (y1[:, t:] - y0[:, t:]).abs().max() > 1e-9, f"token {t} has no effect"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite(name: str) -> None:
    m = make(name).train()
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    (y**2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_measured(name: str) -> None:
    m = make(name)
    with torch.no_grad():
        _, s_short = m(torch.randn(1, 40, D_MODEL, dtype=torch.float64))
        _, s_long = m(torch.randn(1, 120, D_MODEL, dtype=torch.float64))
    short, long = mixers.state_nbytes(s_short), mixers.state_nbytes(s_long)
    assert short > 0
    if m.constant_state:
        assert long == short, f"recurrent state grew from {short} to {long} bytes"
    else:
        assert long > short


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_named(name: str) -> None:
    m = make(name)
    with pytest.raises(ValueError, match="x must"):
        m(torch.randn(2, 5, D_MODEL + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.ones(2, 5, D_MODEL, dtype=torch.long))


def test_unknown_mixer_and_key() -> None:
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        mixers.build("nope", d_model=8)
    with pytest.raises(ValueError, match="bogus"):
        mixers.build("attention", d_model=8, bogus=1)
    with pytest.raises(ValueError, match="n_heads"):
        mixers.build("attention", d_model=10, n_heads=4)
