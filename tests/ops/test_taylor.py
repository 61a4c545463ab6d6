"""Taylor (Based) linear attention: Triton kernels against the reference, the reference against
the feature-map path (``chunked_linear_attention`` on ``taylor_feature_map`` features), and
clear errors for bad inputs.

On CPU the kernel tests run under ``TRITON_INTERPRET=1`` (the Makefile sets it); without it and
without a GPU they skip. Every buffer a kernel must write is poisoned with NaN before the launch.
Tolerances: float32 kernels within 1e-4 relative (norm) of the float64 reference, outputs and
gradients; 16-bit kernels within 1e-2 and within twice the error of plain PyTorch in that dtype.
Shapes are small (the interpreter is slow) but cross tile edges: T = 1, 37, 100 against 32-row
tiles, F = 6 and D = 48 padded to 16 and 64 columns.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from memlab.mixers.based import taylor_feature_map
from memlab.mixers.linear_core import chunked_linear_attention
from memlab.ops.taylor import kernels_available, taylor_attention, taylor_attention_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1") and kernels_available()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    if KERNELS:
        from memlab.ops.taylor import triton as kernels

        monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def _inputs(b, h, t, f, d, dtype=F32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, f, generator=g)
    k = torch.randn(b, h, t, f, generator=g)
    v = torch.randn(b, h, t, d, generator=g)
    do = torch.randn(b, h, t, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def _run(fn, q, k, v, do, **kwargs):
    """Output and the gradients (dq, dk, dv) of <o, do>."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, **kwargs)
    return o, torch.autograd.grad(o, leaves, do)


def _run64(q, k, v, do, eps):
    return _run(taylor_attention_reference, q.double(), k.double(), v.double(), do.double(), eps=eps)


# (B, H, T, F, D, eps); T = 1 has its own test (a single key: o does not depend on the score).
CASES = {
    "t37-f16-d16": (1, 2, 37, 16, 16, 1e-12),
    "t100-f6-d48": (2, 1, 100, 6, 48, 1e-6),
    "t64-f16-d48-bh4": (2, 2, 64, 16, 48, 1e-12),
    "t33-f4-d16": (1, 3, 33, 4, 16, 1e-12),
}


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_float32_matches_reference(name) -> None:
    b, h, t, f, d, eps = CASES[name]
    q, k, v, do = _inputs(b, h, t, f, d, seed=len(name))
    o, grads = _run(taylor_attention, q, k, v, do, eps=eps)
    o64, grads64 = _run64(q, k, v, do, eps)
    assert o.dtype == F32 and o.shape == (b, h, t, d)
    assert torch.isfinite(o).all(), "o: non-finite (an unwritten element?)"
    assert rel_err(o, o64) < 1e-5, f"o: relative error {rel_err(o, o64):.2e}"
    for gname, got, ref in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert got.dtype == F32 and got.shape == ref.shape, gname
        assert torch.isfinite(got).all(), f"{gname}: non-finite (an unwritten element?)"
        assert rel_err(got, ref) < 1e-4, f"{gname}: relative error {rel_err(got, ref):.2e}"


@needs_kernels
@pytest.mark.parametrize(
    "dtype, shape",
    [(BF16, (1, 2, 100, 16, 48)), (BF16, (2, 1, 37, 6, 16)), (F16, (1, 2, 70, 16, 16))],
    ids=["bf16-t100-f16-d48", "bf16-t37-f6-d16", "fp16-t70"],
)
def test_kernel_half_precision(dtype, shape) -> None:
    """16-bit inputs: within 1e-2 of float64 and at most twice the error of plain PyTorch in
    the same dtype (the reference with ``upcast=False``)."""
    b, h, t, f, d = shape
    q, k, v, do = _inputs(b, h, t, f, d, dtype=dtype, seed=t)
    # Scores of a few units, as trained projections give; p then spans about 0.5 to 20.
    q, k = q * 0.7, k * 0.7
    o, grads = _run(taylor_attention, q, k, v, do, eps=1e-6)
    o64, grads64 = _run64(q, k, v, do, 1e-6)
    on, grads_n = _run(taylor_attention_reference, q, k, v, do, eps=1e-6, upcast=False)
    assert o.dtype == dtype
    for gname, got, ref, naive in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64),
                                      (on, *grads_n), strict=True):
        assert got.dtype == dtype, gname
        assert torch.isfinite(got).all(), f"{gname}: non-finite (an unwritten element?)"
        err, base = rel_err(got, ref), rel_err(naive, ref)
        assert err < 1e-2, f"{gname}: relative error {err:.2e}"
        assert err <= 2 * base + 1e-6, f"{gname}: relative error {err:.2e} > 2 x plain {dtype} {base:.2e}"


@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_kernel_single_token(dtype) -> None:
    """T = 1: o = v p / (p + eps) and, with one visible key, o hardly depends on q and k; dq and
    dk are (within rounding of the terms that cancel in them) zero."""
    q, k, v, do = _inputs(2, 2, 1, 16, 16, dtype=dtype, seed=1)
    o, (dq, dk, dv) = _run(taylor_attention, q, k, v, do, eps=1e-12)
    tol = 1e-6 if dtype == F32 else 1e-2
    torch.testing.assert_close(o.float(), v.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dv.float(), do.float(), rtol=tol, atol=tol)
    # The natural scale of dq, dk is |do| |v| |k| / sqrt(F) per element (about 4 here).
    assert dq.abs().max() < 4 * tol and dk.abs().max() < 4 * tol


@needs_kernels
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [((16, 32), (32, 16), (16, 32)), ((32, 16), (16, 32), (32, 16))],
    ids=["m16-n32", "m32-n16"],
)
def test_kernel_uneven_tiles(monkeypatch, fwd, dkdv, dq) -> None:
    """BLOCK_M != BLOCK_N (as in some GPU configs): the diagonal and full-block ranges still hold."""
    from memlab.ops.taylor import triton as kernels

    monkeypatch.setattr(kernels, "fwd_config", lambda *args: kernels.Config(*fwd, 4, 1))
    monkeypatch.setattr(
        kernels, "bwd_config",
        lambda *args: kernels.BwdConfig(kernels.Config(*dkdv, 4, 1), kernels.Config(*dq, 4, 1)),
    )
    q, k, v, do = _inputs(1, 2, 45, 8, 16, seed=4)
    o, grads = _run(taylor_attention, q, k, v, do, eps=1e-12)
    o64, grads64 = _run64(q, k, v, do, 1e-12)
    assert rel_err(o, o64) < 1e-5
    for gname, got, ref in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert rel_err(got, ref) < 1e-4, f"{gname}: relative error {rel_err(got, ref):.2e}"


@needs_kernels
def test_kernel_strided_inputs_and_no_grad() -> None:
    """q, k, v as (B, T, H, X) projections viewed as (B, H, T, X) (the mixers' layout), and a
    no-grad call that gives the same output."""
    b, t, h, f, d = 2, 40, 2, 6, 16
    g = torch.Generator().manual_seed(3)
    qk = torch.randn(b, t, h, 2 * f, generator=g).to(DEVICE)
    q, k = qk[..., :f].transpose(1, 2), qk[..., f:].transpose(1, 2)
    v = torch.randn(b, t, h, d, generator=g).to(DEVICE).transpose(1, 2)
    do = torch.randn(b, h, t, d, generator=g).to(DEVICE)
    o, grads = _run(taylor_attention, q, k, v, do, eps=1e-12)
    o64, grads64 = _run64(q, k, v, do, 1e-12)
    assert rel_err(o, o64) < 1e-5
    for gname, got, ref in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert rel_err(got, ref) < 1e-4, f"{gname}: relative error {rel_err(got, ref):.2e}"
    with torch.no_grad():
        torch.testing.assert_close(taylor_attention(q, k, v, eps=1e-12), o, rtol=0, atol=0)


@needs_kernels
def test_kernel_matches_feature_map_path() -> None:
    """The kernel (float32) against chunked linear attention on the Taylor features (float64),
    output and gradients through the feature map."""
    b, h, t, f, d, eps = 1, 2, 50, 4, 16, 1e-12
    q, k, v, do = _inputs(b, h, t, f, d, seed=8)

    def feature_path(q, k, v, eps):
        fq, fk = taylor_feature_map(q), taylor_feature_map(k)
        kv0 = q.new_zeros(b, h, fq.shape[-1], d)
        z0 = q.new_zeros(b, h, fq.shape[-1])
        return chunked_linear_attention(fq, fk, v, kv0, z0, chunk_size=16, eps=eps)[0]

    o, grads = _run(taylor_attention, q, k, v, do, eps=eps)
    o64, grads64 = _run(feature_path, q.double(), k.double(), v.double(), do.double(), eps=eps)
    assert rel_err(o, o64) < 1e-5
    for gname, got, ref in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert rel_err(got, ref) < 1e-4, f"{gname}: relative error {rel_err(got, ref):.2e}"


# ----------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("t, f, chunk", [(1, 4, 8), (33, 4, 5), (70, 16, 16), (9, 6, 64)])
def test_reference_equals_feature_map_path(t, f, chunk) -> None:
    """Reference == chunked_linear_attention(taylor_feature_map(q), taylor_feature_map(k), v) in
    float64, outputs and gradients."""
    b, h, d, eps = 2, 2, 5, 1e-12
    q, k, v, do = _inputs(b, h, t, f, d, dtype=F64, seed=t, device="cpu")
    q, k = 1.5 * q, 1.5 * k

    def feature_path(q, k, v, eps):
        fq, fk = taylor_feature_map(q), taylor_feature_map(k)
        kv0, z0 = q.new_zeros(b, h, fq.shape[-1], d), q.new_zeros(b, h, fq.shape[-1])
        return chunked_linear_attention(fq, fk, v, kv0, z0, chunk_size=chunk, eps=eps)[0]

    o, grads = _run(taylor_attention_reference, q, k, v, do, eps=eps)
    o_f, grads_f = _run(feature_path, q, k, v, do, eps=eps)
    assert o.dtype == F64
    torch.testing.assert_close(o, o_f, rtol=0, atol=1e-10)
    for got, ref in zip(grads, grads_f, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_reference_by_hand() -> None:
    """Two tokens, F = 1: s = q k, p = 1 + s + s^2 / 2, written out."""
    q = torch.tensor([1.0, 2.0], dtype=F64).view(1, 1, 2, 1)
    k = torch.tensor([0.5, -1.0], dtype=F64).view(1, 1, 2, 1)
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64).view(1, 1, 2, 2)

    def p(s):
        return 1 + s + s * s / 2

    p00, p10, p11 = p(0.5), p(1.0), p(-2.0)
    expected = torch.tensor([[1.0, 0.0], [p10 / (p10 + p11), 3 * p11 / (p10 + p11)]], dtype=F64)
    o = taylor_attention_reference(q, k, v, eps=0.0)
    torch.testing.assert_close(o.view(2, 2), expected, rtol=1e-15, atol=1e-15)
    assert p00 > 0 and p(torch.linspace(-5, 5, 101)).min() >= 0.5


def test_dispatch_off_the_kernel_path(monkeypatch) -> None:
    """CPU tensors without the interpreter, and float64 tensors anywhere, run the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, do = _inputs(1, 2, 9, 4, 8, device="cpu")
    o, grads = _run(taylor_attention, q, k, v, do, eps=1e-12)
    o64, grads64 = _run64(q, k, v, do, 1e-12)
    torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads64, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    o, grads = _run(taylor_attention, q.double(), k.double(), v.double(), do.double(), eps=1e-12)
    assert o.dtype == F64
    torch.testing.assert_close(o, o64, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# input checks


def _bad(**changes):
    q, k, v, _ = _inputs(2, 2, 5, 4, 8, device="cpu")
    args = dict(q=q, k=k, v=v, eps=1e-6)
    args.update(changes)
    return args


BAD = {
    "q-not-tensor": (lambda: _bad(q=[[1.0]]), "q"),
    "q-rank": (lambda: _bad(q=torch.randn(2, 5, 4)), "q"),
    "q-int": (lambda: _bad(q=torch.ones(2, 2, 5, 4, dtype=torch.int64)), "q"),
    "q-empty": (lambda: _bad(q=torch.randn(2, 2, 0, 4), k=torch.randn(2, 2, 0, 4), v=torch.randn(2, 2, 0, 8)),
                "q"),
    "q-F-too-large": (lambda: _bad(q=torch.randn(2, 2, 5, 65), k=torch.randn(2, 2, 5, 65)), "q"),
    "k-shape": (lambda: _bad(k=torch.randn(2, 2, 5, 3)), "k"),
    "k-dtype": (lambda: _bad(k=torch.randn(2, 2, 5, 4, dtype=F64)), "k"),
    "v-time": (lambda: _bad(v=torch.randn(2, 2, 4, 8)), "v"),
    "v-heads": (lambda: _bad(v=torch.randn(2, 3, 5, 8)), "v"),
    "v-D-too-large": (lambda: _bad(v=torch.randn(2, 2, 5, 257)), "v"),
    "v-dtype": (lambda: _bad(v=torch.randn(2, 2, 5, 8).to(BF16)), "v"),
    "eps-zero": (lambda: _bad(eps=0.0), "eps"),
    "eps-negative": (lambda: _bad(eps=-1e-6), "eps"),
    "eps-nan": (lambda: _bad(eps=math.nan), "eps"),
    "eps-bool": (lambda: _bad(eps=True), "eps"),
    "eps-none": (lambda: _bad(eps=None), "eps"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_name_the_argument(name) -> None:
    make, arg = BAD[name]
    args = make()
    args = {key: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for key, x in args.items()}
    with pytest.raises(ValueError, match=rf"^{arg}[ ']"):
        taylor_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
