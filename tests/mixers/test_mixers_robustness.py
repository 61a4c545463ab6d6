"""Property tests over every registered mixer for cases test_invariance.py does not reach.

- lengths 1, 2 and lengths one off each mixer's own chunk / block / window / span boundary, at
  batch sizes 1 and 3, and uneven chunk splits (1, 7, rest);
- other d_model / head counts and non-default options: the invariance must still hold;
- float32 (its own tolerance) as well as float64; a state moved to another dtype; a state from
  ``init_state`` used directly for decoding; states are not mutated and can be reused;
- batch rows are independent; gradients through chunked calls equal those of one full call;
- invalid configurations raise ValueError naming the option and its value;
- ``LM.generate`` equals greedy decoding by repeated full forwards.

Tolerances: float64 atol 1e-8 (anything above accumulated rounding is a real mismatch); float32
atol 5e-4 + rtol 1e-3 (the memory mixers take large inner steps, so float32 rounding grows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from memlab import mixers
from memlab.models.lm import LM

F64 = {"atol": 1e-8, "rtol": 0.0}
F32 = {"atol": 5e-4, "rtol": 1e-3}
NAMES = mixers.names()
# options that set a chunk, block, span or window length: sequence lengths straddle them
LENGTH_KEYS = ("chunk_size", "block_size", "span", "window", "cluster_window", "kernel_size", "select_chunk")

# Non-default options per mixer, with other d_model / head combinations: (d_model, options).
VARIANTS: dict[str, list[tuple[int, dict[str, Any]]]] = {
    "attention": [(48, {"n_heads": 3}), (96, {"n_heads": 2, "n_kv_heads": 1, "rope": False, "bias": True})],
    "sliding_window": [(48, {"n_heads": 3, "window": 1}), (96, {"n_heads": 2, "n_kv_heads": 1, "window": 5})],
    "based": [
        (
            48,
            {"n_heads": 3, "feature_dim": 3, "chunk_size": 5, "window": 3, "window_heads": 3, "conv_size": 0},
        ),
        (96, {"n_heads": 2, "feature_dim": 5, "chunk_size": 1, "window": 0, "conv_size": 1}),
    ],
    "combiner": [
        (48, {"n_heads": 3, "span": 5, "factorization": "fixed"}),
        (96, {"n_heads": 2, "span": 3, "factorization": "axial", "rope": False}),
    ],
    "gam": [(48, {"conv_kernel": 1, "n_slots": 1}), (96, {"conv_kernel": 5, "n_slots": 7})],
    "hopfield": [
        (48, {"n_heads": 3, "window": 3}),
        (96, {"n_heads": 2, "window": 1, "update_steps": 2, "beta": 0.5}),
    ],
    "landmark": [
        (48, {"n_heads": 3, "block_size": 3, "top_k": 1, "mode": "topk"}),
        (
            96,
            {
                "n_heads": 2,
                "block_size": 2,
                "top_k": 2,
                "mode": "topk",
                "memory_blocks": 3,
                "position_mapping": "stingy",
            },
        ),
        (32, {"n_heads": 4, "block_size": 5, "top_k": 1, "memory_blocks": 1}),
    ],
    "linear_attention": [
        (48, {"n_heads": 3, "chunk_size": 5}),
        (
            96,
            {"n_heads": 2, "chunk_size": 1, "feature_dim": 3, "feature_map": "identity", "normalize": False},
        ),
    ],
    "mamba": [
        (48, {"d_state": 3, "chunk_size": 5, "d_conv": 2}),
        (96, {"d_state": 2, "chunk_size": 1, "d_conv": 1, "expand": 1, "dt_rank": 3}),
    ],
    "memmamba": [
        (
            48,
            {
                "n_layers": 1,
                "pool_size": 2,
                "d_summary": 6,
                "n_heads": 3,
                "summary_every": 3,
                "select_chunk": 1,
                "d_state": 3,
                "chunk_size": 5,
            },
        ),
        (
            32,
            {
                "n_layers": 3,
                "pool_size": 1,
                "d_summary": 4,
                "n_heads": 2,
                "select_chunk": 3,
                "d_state": 2,
                "chunk_size": 2,
                "cross_layer_every": 2,
                "tau_token": 0.0,
                "tau_state": 0.0,
            },
        ),
    ],
    "rcmha": [
        (48, {"n_heads": 3, "kernel_size": 1}),
        (96, {"n_heads": 2, "kernel_size": 5, "relative": "bucket", "n_buckets": 4, "max_distance": 5}),
    ],
    "routing": [
        (48, {"n_heads": 3, "n_clusters": 2, "window": 2, "cluster_window": 5}),
        (96, {"n_heads": 2, "n_routing_heads": 2, "n_clusters": 1, "window": 1, "cluster_window": None}),
    ],
}
for _name in ("memora", "moneta", "yaad"):
    VARIANTS[_name] = [
        (48, {"n_heads": 3, "chunk_size": 5, "mem_expansion": 1, "mem_depth": 1}),
        (96, {"n_heads": 2, "chunk_size": 1, "mem_expansion": 2, "conv_size": 0, "mem_residual_norm": True}),
    ]
for _name in ("titans_mac", "titans_mag", "titans_mal"):
    _win = {} if _name == "titans_mac" else {"window": 2}
    VARIANTS[_name] = [
        (48, {"n_heads": 3, "chunk_size": 5, "mem_expansion": 1, "mem_depth": 1, "n_persistent": 0, **_win}),
        (96, {"n_heads": 2, "chunk_size": 1, "mem_expansion": 2, "conv_size": 0, "n_persistent": 1}),
    ]
# options that may be 0 (they turn a branch off); every other int option must be >= 1
ZERO_OK = {
    "window": ("based",),
    "conv_size": ("based", "memora", "moneta", "yaad", "titans_mac", "titans_mag", "titans_mal"),
    "n_persistent": ("titans_mac", "titans_mag", "titans_mal"),
}


def make(
    name: str, d_model: int = 32, dtype: torch.dtype = torch.float64, seed: int = 0, **cfg: Any
) -> mixers.Mixer:
    torch.manual_seed(seed)
    options = cfg or dict(mixers.MIXERS.get(name).test_config)
    return mixers.build(name, d_model=d_model, **options).to(dtype).eval()


def run_chunks(m: mixers.Mixer, x: torch.Tensor, sizes: list[int], state: Any = None) -> torch.Tensor:
    outs, i = [], 0
    for n in sizes:
        if n:
            y, state = m(x[:, i : i + n], state=state)
            outs.append(y)
            i += n
    assert i == x.shape[1]
    return torch.cat(outs, dim=1)


def check_invariance(m: mixers.Mixer, x: torch.Tensor, tol: dict[str, float]) -> None:
    t = x.shape[1]
    with torch.no_grad():
        full, _ = m(x)
        decoded = run_chunks(m, x, [1] * t)
        uneven = run_chunks(m, x, [1, min(7, t - 1), max(t - 8, 0)])
    assert torch.isfinite(full).all()
    torch.testing.assert_close(decoded, full, **tol)
    torch.testing.assert_close(uneven, full, **tol)


def boundary_lengths(name: str) -> list[int]:
    cfg = mixers.MIXERS.get(name).test_config
    lengths = {1, 2}
    for key in LENGTH_KEYS:
        c = cfg.get(key)
        if isinstance(c, int) and c > 1:
            lengths |= {c - 1, c + 1, 2 * c + 3}
    return sorted(lengths)


def map_state(state: Any, fn: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(v, fn) for v in state)
    return state


def states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_boundary_lengths_and_batches(name: str, batch: int) -> None:
    m = make(name)
    torch.manual_seed(batch)
    for t in boundary_lengths(name):
        x = torch.randn(batch, t, 32, dtype=torch.float64)
        check_invariance(m, x, F64)


@pytest.mark.parametrize(
    "name, d_model, cfg",
    [(n, d, c) for n in NAMES for d, c in VARIANTS.get(n, [])],
    ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else "",
)
def test_other_configs_keep_invariance(name: str, d_model: int, cfg: dict[str, Any]) -> None:
    m = make(name, d_model, seed=3, **cfg)
    torch.manual_seed(4)
    x = torch.randn(2, 13, d_model, dtype=torch.float64)
    check_invariance(m, x, F64)
    with torch.no_grad():  # the first 9 tokens do not depend on the last 4
        y, _ = m(x)
        x2 = x.clone()
        x2[:, 9:] += 1.0
        y2, _ = m(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9], **F64)


def test_every_mixer_has_variants() -> None:
    assert set(VARIANTS) == set(NAMES), "add non-default options for new mixers to VARIANTS"


@pytest.mark.parametrize("name", NAMES)
def test_float32(name: str) -> None:
    m64 = make(name)
    m32 = make(name, dtype=torch.float32)
    m32.load_state_dict(m64.state_dict())
    torch.manual_seed(5)
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    check_invariance(m32, x.float(), F32)
    with torch.no_grad():
        y32, s32 = m32(x.float())
        y64, _ = m64(x)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=2e-3, rtol=1e-3)
    assert all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in _tensors(s32)), (
        "a float32 run must not keep float64 state"
    )


def _tensors(state: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_state(state, out.append)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_state_moved_to_another_dtype(name: str) -> None:
    """Prefill in float64, move model and state to float32, continue: close to the float64 run."""
    m64 = make(name)
    m32 = make(name, dtype=torch.float32)
    m32.load_state_dict(m64.state_dict())
    torch.manual_seed(6)
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m64(x)
        _, state = m64(x[:, :6])
        moved = map_state(state, lambda v: v.float() if v.is_floating_point() else v)
        rest = run_chunks(m32, x[:, 6:].float(), [1, 3, 4], state=moved)
    assert rest.dtype == torch.float32
    torch.testing.assert_close(rest.double(), full[:, 6:], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_init_state_decode_and_state_reuse(name: str) -> None:
    m = make(name)
    torch.manual_seed(7)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        decoded = run_chunks(m, x, [1] * 9, state=m.init_state(1, "cpu", torch.float64))
        torch.testing.assert_close(decoded, full, **F64)
        _, s = m(x[:, :4])
        before = map_state(s, torch.clone)
        a, _ = m(x[:, 4:], state=s)
        assert states_equal(s, before), "forward mutated the state it was given"
        b, _ = m(x[:, 4:], state=s)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, full[:, 4:], **F64)


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_independent(name: str) -> None:
    m = make(name)
    torch.manual_seed(8)
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        for i in range(3):
            yi, _ = m(x[i : i + 1])
            torch.testing.assert_close(yi, full[i : i + 1], **F64)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_through_state_passing(name: str) -> None:
    """Gradients flow across chunk boundaries through the state: chunked == full."""
    m = make(name)
    torch.manual_seed(9)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    w = torch.randn(2, 11, 32, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    (m(xa)[0] * w).sum().backward()
    xb = x.clone().requires_grad_(True)
    (run_chunks(m, xb, [1, 6, 4]) * w).sum().backward()
    assert xa.grad is not None and xb.grad is not None
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-7, rtol=1e-6)


# ---- invalid configurations and inputs ---------------------------------------------------------


def _int_fields(name: str) -> list[str]:
    cls = mixers.MIXERS.get(name)
    return [
        f.name
        for f in dataclasses.fields(cls.Config)
        if f.name != "d_model" and isinstance(f.default, int) and not isinstance(f.default, bool)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_bad_int_options_named(name: str) -> None:
    base = dict(mixers.MIXERS.get(name).test_config)
    fields = _int_fields(name)
    assert fields, "every mixer has an integer option"
    for field in fields:
        bad_values: list[Any] = [-1, 2.5, True if field not in ("n_persistent",) else -3]
        if name not in ZERO_OK.get(field, ()):
            bad_values.append(0)
        for bad in bad_values:
            with pytest.raises((ValueError, TypeError), match=field) as info:
                mixers.build(name, d_model=32, **{**base, field: bad})
            assert repr(bad) in str(info.value) or str(bad) in str(info.value), (field, bad, str(info.value))
    with pytest.raises(ValueError, match="d_model"):
        mixers.build(name, d_model=0, **base)
    with pytest.raises(ValueError, match="bogus_key"):
        mixers.build(name, d_model=32, bogus_key=1, **base)


HEADED = [n for n in NAMES if "n_heads" in {f.name for f in dataclasses.fields(mixers.MIXERS.get(n).Config)}]


@pytest.mark.parametrize("name", HEADED)
def test_heads_must_divide(name: str) -> None:
    cfg = {**mixers.MIXERS.get(name).test_config, "n_heads": 5}
    field = "d_summary" if name == "memmamba" else "d_model"
    with pytest.raises(ValueError, match=rf"n_heads=5 must divide {field}=\d+"):
        mixers.build(name, d_model=32, **cfg)


def test_landmark_top_k_above_blocks_and_routing_clusters_above_length() -> None:
    with pytest.raises(ValueError, match=r"top_k=3 .*memory_blocks=2"):
        mixers.build("landmark", d_model=32, n_heads=2, block_size=4, top_k=3, memory_blocks=2)
    m = mixers.build("routing", d_model=32, n_heads=4, n_clusters=6, window=4).train()
    with pytest.raises(ValueError, match=r"n_clusters=6 .*T=5"):
        m(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="n_routing_heads"):
        mixers.build("routing", d_model=32, n_heads=4, n_routing_heads=5)
    with pytest.raises(ValueError, match="cross_layer_every=2"):
        mixers.build("memmamba", d_model=32, n_layers=2, cross_layer_every=2)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_named(name: str) -> None:
    m = make(name)
    for x in (torch.randn(4, 32), torch.randn(1, 2, 3, 32), torch.randn(2, 3, 31), torch.randn(2, 0, 32)):
        with pytest.raises(ValueError, match=r"x must .*got"):
            m(x.double())
    with pytest.raises(ValueError, match="int32"):
        m(torch.ones(2, 3, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="Tensor"):
        m([[0.0] * 32])


# ---- the LM ------------------------------------------------------------------------------------


def _prompt_lengths(name: str) -> list[int]:
    cfg = mixers.MIXERS.get(name).test_config
    chunk = max([cfg[k] for k in LENGTH_KEYS if isinstance(cfg.get(k), int)] + [4])
    return [1, chunk + 2]


@pytest.mark.parametrize("name", NAMES)
def test_generate_equals_greedy_full_recompute(name: str) -> None:
    torch.manual_seed(10)
    lm = (
        LM.from_mixer(
            name,
            vocab_size=17,
            d_model=32,
            n_layers=2,
            short_conv=3,
            mixer_options=dict(mixers.MIXERS.get(name).test_config),
        )
        .double()
        .eval()
    )
    for p in _prompt_lengths(name):
        ids = torch.randint(0, 17, (2, p))
        out = lm.generate(ids, 5)
        ref = ids
        with torch.no_grad():
            for _ in range(5):
                logits, _ = lm(ref)
                ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.shape == (2, p + 5)
        assert torch.equal(out, ref), (p, out.tolist(), ref.tolist())
        assert torch.equal(lm.generate(ids, 0), ids)


def test_generate_rejects_bad_arguments() -> None:
    lm = LM.from_mixer("attention", vocab_size=11, d_model=16, n_layers=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(torch.zeros(1, 2, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="ids must"):
        lm.generate(torch.zeros(2, dtype=torch.long), 3)


CONSTANT = [n for n in NAMES if mixers.MIXERS.get(n).constant_state]


@pytest.mark.parametrize("name", CONSTANT)
def test_constant_state_bytes_from_the_first_token(name: str) -> None:
    """Default options (windows of 64): prefills shorter than the window keep the same state size."""
    m = mixers.build(name, d_model=32).eval()
    sizes = [mixers.state_nbytes(m.init_state(1, "cpu", torch.float32))]
    with torch.no_grad():
        for length in (1, 5, 40, 70):
            _, state = m(torch.randn(1, length, 32))
            sizes.append(mixers.state_nbytes(state))
    assert len(set(sizes)) == 1, f"state bytes after prefills of 0, 1, 5, 40, 70 tokens: {sizes}"


@pytest.mark.parametrize("name", mixers.names())
def test_state_of_another_batch_size_is_named(name: str) -> None:
    m = make(name)
    _, state = m(torch.randn(2, 5, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="state holds batch size 2, but x has batch size 3"):
        m(torch.randn(3, 1, 32, dtype=torch.float64), state=state)
