"""Selective-scan Triton kernels against the float64 reference: output, final state, every gradient.

On CPU the kernel tests run under ``TRITON_INTERPRET=1`` (the Makefile sets it); without it and
without a GPU they skip. Every buffer a kernel must write is poisoned with NaN before the launch.
Shapes are tiny (the interpreter walks every time step in Python) but awkward: T crossing the
64-step chunk boundary, channel counts that are not a multiple of the channel block, N not a
power of two.
"""

from __future__ import annotations

import os

import pytest
import torch

from memlab.ops.scan import kernels_available, selective_scan, selective_scan_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1") and kernels_available()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
NAMES = ("x", "delta", "A", "B", "C", "D", "z", "h0")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    if KERNELS:
        from memlab.ops.scan import triton as kernels

        monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


def _inputs(b, t, d, n, *, has_d=True, has_z=True, has_h0=True, dtype=torch.float32, seed=0):
    """Mamba-like inputs: delta in (0, 0.5] (softplus output), A negative (S4D-real spread)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x = rnd(b, t, d).to(dtype)
    delta = (0.5 * torch.rand(b, t, d, generator=g) + 0.01).to(dtype)
    a = -(torch.arange(1, n + 1).float() * (0.5 + torch.rand(d, 1, generator=g)))  # float32
    bm, cm = rnd(b, t, n).to(dtype), rnd(b, t, n).to(dtype)
    dskip = rnd(d) if has_d else None
    z = rnd(b, t, d).to(dtype) if has_z else None
    h0 = rnd(b, d, n) if has_h0 else None
    return [None if v is None else v.to(DEVICE) for v in (x, delta, a, bm, cm, dskip, z, h0)]


def _run(fn, inputs, dy, dh, **kwargs):
    """Output, final state and the gradients of <y, dy> + <h_T, dh> for every given input."""
    given = [v.detach().clone().requires_grad_() if v is not None else None for v in inputs]
    x, delta, a, bm, cm, dskip, z, h0 = given
    y, h_t = fn(x, delta, a, bm, cm, dskip, z, h0=h0, return_state=True, **kwargs)
    loss = (y.double() * dy.double()).sum() + (h_t.double() * dh.double()).sum()
    leaves = [v for v in given if v is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    return y, h_t, [next(grads) if v is not None else None for v in given]


def _as64(inputs):
    return [None if v is None else v.double() for v in inputs]


def rel_err(got, ref):
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


# (batch, T, d, N, has_D, has_z, has_h0)
CASES = {
    "t1": (1, 1, 11, 4, True, True, True),
    "t7-plain": (2, 7, 9, 16, False, False, False),
    "t65-d-z": (1, 65, 11, 4, True, True, False),
    "t65-h0-only-n5": (2, 65, 5, 5, False, False, True),
    "t130-all-n16": (1, 130, 10, 16, True, True, True),
}


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_reference(name) -> None:
    b, t, d, n, has_d, has_z, has_h0 = CASES[name]
    inputs = _inputs(b, t, d, n, has_d=has_d, has_z=has_z, has_h0=has_h0, seed=len(name))
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(b, t, d, generator=g).to(DEVICE)
    dh = torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h_t, grads = _run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = _run(selective_scan_reference, _as64(inputs), dy, dh)
    assert y.dtype == torch.float32 and h_t.dtype == torch.float32
    assert rel_err(y, y64) < 1e-5, "y"
    assert rel_err(h_t, h64) < 1e-5, "h_T"
    for name_, got, ref in zip(NAMES, grads, grads64, strict=True):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == inputs[NAMES.index(name_)].dtype, name_
        assert torch.isfinite(got).all(), f"d{name_}: non-finite (an unwritten element?)"
        assert rel_err(got, ref) < 2e-5, f"d{name_}: relative error {rel_err(got, ref):.2e}"


@needs_kernels
def test_kernel_many_short_chunks(monkeypatch) -> None:
    """Chunks of 5 steps and channel blocks of 4: the backward walks 5 chunks x 4 blocks."""
    from memlab.ops.scan import triton as kernels

    monkeypatch.setattr(kernels, "scan_config", lambda *args: kernels.Config(5, 4, 1))
    b, t, d, n = 2, 23, 14, 4
    inputs = _inputs(b, t, d, n, seed=21)
    g = torch.Generator().manual_seed(9)
    dy = torch.randn(b, t, d, generator=g).to(DEVICE)
    dh = torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h_t, grads = _run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = _run(selective_scan_reference, _as64(inputs), dy, dh)
    assert rel_err(y, y64) < 1e-5 and rel_err(h_t, h64) < 1e-5
    for name, got, ref in zip(NAMES, grads, grads64, strict=True):
        assert rel_err(got, ref) < 2e-5, f"d{name}: relative error {rel_err(got, ref):.2e}"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_within_plain_pytorch_error(dtype) -> None:
    """16-bit x, delta, B, C, z with float32 A, D, h0 (Mamba under autocast): the kernel's error
    against float64 is at most twice that of the reference loop run in the same dtype."""
    b, t, d, n = 1, 70, 10, 16
    inputs = _inputs(b, t, d, n, dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(8)
    dy = torch.randn(b, t, d, generator=g).to(device=DEVICE, dtype=dtype)
    dh = torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h_t, grads = _run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = _run(selective_scan_reference, _as64(inputs), dy, dh)
    yn, hn, grads_n = _run(selective_scan_reference, inputs, dy, dh, upcast=False)
    assert y.dtype == dtype
    assert rel_err(y, y64) <= 2 * rel_err(yn, y64), "y"
    assert rel_err(h_t, h64) <= 2 * rel_err(hn, h64) + 1e-6, "h_T"
    for name, got, ref, naive in zip(NAMES, grads, grads64, grads_n, strict=True):
        assert got.dtype == inputs[NAMES.index(name)].dtype, name
        err, base = rel_err(got, ref), rel_err(naive, ref)
        assert err <= 2 * base + 1e-6, f"d{name}: relative error {err:.2e} > 2 x plain {dtype} {base:.2e}"


@needs_kernels
def test_two_calls_through_the_state_equal_one() -> None:
    b, t, d, n, cut = 2, 70, 9, 4, 41
    x, delta, a, bm, cm, dskip, z, h0 = _inputs(b, t, d, n, seed=5)
    y, h_t = selective_scan(x, delta, a, bm, cm, dskip, z, h0=h0, return_state=True)
    y1, h1 = selective_scan(x[:, :cut], delta[:, :cut], a, bm[:, :cut], cm[:, :cut], dskip, z[:, :cut],
                            h0=h0, return_state=True)
    y2, h2 = selective_scan(x[:, cut:], delta[:, cut:], a, bm[:, cut:], cm[:, cut:], dskip, z[:, cut:],
                            h0=h1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2, h_t, rtol=1e-6, atol=1e-6)
    # Without gradients the kernel stores no chunk states: the same output either way.
    y_grad = selective_scan(x, delta, a.clone().requires_grad_(), bm, cm, dskip, z, h0=h0)
    torch.testing.assert_close(y_grad.detach(), y, rtol=0, atol=0)


@needs_kernels
def test_kernel_strided_inputs() -> None:
    """x, z, B, C as column slices of wider projections (the Mamba layout), delta transposed."""
    b, t, d, n = 2, 9, 6, 4
    g = torch.Generator().manual_seed(12)
    xz = torch.randn(b, t, 2 * d, generator=g).to(DEVICE)
    dbc = torch.randn(b, t, 3 + 2 * n, generator=g).to(DEVICE)
    delta = torch.rand(b, d, t, generator=g).to(DEVICE).transpose(1, 2)
    x, z = xz[..., :d], xz[..., d:]
    bm, cm = dbc[..., 3 : 3 + n], dbc[..., 3 + n :]
    a = -torch.rand(d, n, generator=g).to(DEVICE) - 0.5
    inputs = [x, delta, a, bm, cm, None, z, None]
    dy, dh = torch.randn(b, t, d, generator=g).to(DEVICE), torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h_t, grads = _run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = _run(selective_scan_reference, _as64(inputs), dy, dh)
    assert rel_err(y, y64) < 1e-5 and rel_err(h_t, h64) < 1e-5
    for name, got, ref in zip(NAMES, grads, grads64, strict=True):
        if ref is not None:
            assert rel_err(got, ref) < 2e-5, f"d{name}"


def test_reference_dispatch_off_the_kernel_path(monkeypatch) -> None:
    """CPU tensors without the interpreter run the reference, gradients included."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = _inputs(2, 9, 3, 4, seed=11)
    inputs = [v.cpu() if v is not None else None for v in inputs]
    dy, dh = torch.randn(2, 9, 3), torch.randn(2, 3, 4)
    y, h_t, grads = _run(selective_scan, inputs, dy, dh)
    y64, h64, grads64 = _run(selective_scan_reference, _as64(inputs), dy, dh)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_t.double(), h64, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads64, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_reference_is_the_recurrence() -> None:
    """The reference against the closed form of a one-channel, one-state scan."""
    x = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    delta = torch.full_like(x, 0.5)
    a = torch.tensor([[-2.0]], dtype=torch.float64)
    bm = torch.tensor([[[1.0], [0.5], [2.0]]], dtype=torch.float64)
    cm = torch.tensor([[[1.0], [1.0], [-1.0]]], dtype=torch.float64)
    y, h = selective_scan_reference(x, delta, a, bm, cm, return_state=True)
    e = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    h1 = 0.5 * 1.0 * 1.0
    h2 = e * h1 + 0.5 * 0.5 * 2.0
    h3 = e * h2 + 0.5 * 2.0 * 3.0
    torch.testing.assert_close(y.flatten(), torch.stack([h1 + 0 * e, h2, -h3]))
    torch.testing.assert_close(h.flatten(), h3.reshape(1))


def _bad(**changes):
    x, delta, a, bm, cm, dskip, z, h0 = _inputs(2, 5, 3, 4, seed=1)
    args = dict(x=x, delta=delta, A=a, B=bm, C=cm, D=dskip, z=z, h0=h0)
    args.update(changes)
    return args


BAD = {
    "delta-shape": (lambda: _bad(delta=torch.rand(2, 5, 4)), "delta"),
    "A-rows": (lambda: _bad(A=-torch.rand(4, 4)), "A"),
    "A-dtype-int": (lambda: _bad(A=-torch.ones(3, 4, dtype=torch.int64)), "A"),
    "A-dtype-f64": (lambda: _bad(A=-torch.rand(3, 4, dtype=torch.float64)), "A"),
    "B-state-size": (lambda: _bad(B=torch.randn(2, 5, 8)), "B"),
    "C-time": (lambda: _bad(C=torch.randn(2, 4, 4)), "C"),
    "D-shape": (lambda: _bad(D=torch.randn(4)), "D"),
    "z-shape": (lambda: _bad(z=torch.randn(2, 5, 2)), "z"),
    "h0-shape": (lambda: _bad(h0=torch.randn(2, 3, 5)), "h0"),
    "x-rank": (lambda: _bad(x=torch.randn(5, 3)), "x"),
    "x-dtype": (lambda: _bad(x=torch.randn(2, 5, 3, dtype=torch.float64)), "x"),
    "T-zero": (lambda: _bad(x=torch.randn(2, 0, 3), delta=torch.rand(2, 0, 3), B=torch.randn(2, 0, 4),
                            C=torch.randn(2, 0, 4), z=None), "x"),
    "N-too-large": (lambda: _bad(A=-torch.rand(3, 512), B=torch.randn(2, 5, 512), C=torch.randn(2, 5, 512),
                                 h0=None), "A"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_name_the_argument(name) -> None:
    make, arg = BAD[name]
    args = make()
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=rf"^{arg}[ ']"):
        selective_scan(args.pop("x"), args.pop("delta"), args.pop("A"), args.pop("B"), args.pop("C"),
                       args.pop("D"), args.pop("z"), **args)
