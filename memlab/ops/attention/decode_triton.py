"""Split-KV decoding (flash-decoding) over ragged per-(batch, KV head) caches, in Triton.

Decoding reads the whole cache once per step and does little arithmetic on it, so the only goal
is to stream the cache at memory speed. With B = 1 there are only Hkv (batch, KV head) pairs, far
fewer than the GPU's multiprocessors, so the key axis is split into chunks: one program per
(chunk, batch x KV head) computes a partial softmax over its chunk, and a second kernel merges
the partials by their log-sum-exp. One program serves all G = H / Hkv query heads of its KV head
(and all Tq queries) at once, so every key and value is read from memory once, not G times.

Each (batch, KV head) has its own number of valid keys (``lengths``), so per-head KV budgets
shrink the work and the memory read, not just the mask: chunks past a head's length exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlab.ops.attention import triton as kernels
from memlab.ops.attention.triton import INTERPRET, LOG2E, NO_WINDOW, _cast, _mma, _offset, _tile, interpreting

_SM_COUNT: dict[int, int] = {}


@triton.jit
def _decode_steps(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
    start, end, qpos, window, sinks, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        in_range = kpos < end
        k = tl.load(_tile(k_base, start_n, stride_ks, offs_n, offs_d), mask=in_range[:, None], other=0.0)
        v = tl.load(_tile(v_base, start_n, stride_vs, offs_n, offs_d), mask=in_range[:, None], other=0.0)
        s = _mma(q, tl.trans(k), None, INTERPRET)
        vis = in_range[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            vis = vis & ((kpos[None, :] > qpos[:, None] - window) | (kpos[None, :] < sinks))
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(_cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def decode_fwd_kernel(
    Q, K, V, LENGTHS, O_PART, LSE_PART,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_lb, stride_lh,
    Tq, Hkv, G, n_split, n_row_groups, chunk, qk_scale, window, sinks,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Partial attention of one key chunk. Grid (n_split, B * Hkv, n_row_groups).

    Row r of a program's tile is query head kvh * G + r % G at query index r // G. Writes
    O_PART (B * Hkv * n_row_groups, n_split, ROWS, D), normalised within the chunk, and LSE_PART
    (same, without D), base-2 log-sum-exp, -inf for a chunk with no visible key.
    """
    pid_s = tl.program_id(0)
    bk = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = bk // Hkv
    kvh = bk % Hkv
    length = tl.load(LENGTHS + b * stride_lb + kvh * stride_lh)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    r = pid_r * ROWS + offs_r
    row_ok = r < G * Tq
    g = r % G
    t = r // G
    qpos = length - Tq + t
    q_rows = Q + tl.cast(b, tl.int64) * stride_qb + t * stride_qt + (kvh * G + g) * stride_qh  # (ROWS,)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + _offset(b, stride_kb, kvh, stride_kh, 0, 0)
    v_base = V + _offset(b, stride_vb, kvh, stride_vh, 0, 0)
    c0 = pid_s * chunk
    c1 = tl.minimum(c0 + chunk, length)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    if HAS_WINDOW:
        # The earliest key any of the Tq queries sees through the window; before it only sinks.
        lo = tl.maximum(length - Tq - window + 1, 0)
        acc, l_i, m_i = _decode_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                      c0, tl.minimum(c1, tl.minimum(sinks, lo)), qpos, window, sinks,
                                      qk_scale, D, BLOCK_N, HAS_WINDOW)
        acc, l_i, m_i = _decode_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                      tl.maximum(c0, lo), c1, qpos, window, sinks,
                                      qk_scale, D, BLOCK_N, HAS_WINDOW)
    else:
        acc, l_i, m_i = _decode_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                      c0, c1, qpos, window, sinks, qk_scale, D, BLOCK_N, HAS_WINDOW)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = tl.cast((bk * n_row_groups + pid_r) * n_split + pid_s, tl.int64) * ROWS
    tl.store(O_PART + (part + offs_r[:, None]) * D + offs_d[None, :], o)
    tl.store(LSE_PART + part + offs_r, lse)


@triton.jit
def decode_reduce_kernel(
    O_PART, LSE_PART, O,
    stride_ob, stride_ot, stride_oh,
    Tq, Hkv, G, n_split, n_row_groups,
    D: tl.constexpr, ROWS: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    """Merge the chunk partials of one query row: o = sum_i 2^(lse_i - lse) o_i. Grid (B * Hkv, G * Tq)."""
    bk = tl.program_id(0)
    r = tl.program_id(1)
    b = bk // Hkv
    kvh = bk % Hkv
    pid_r = r // ROWS
    row = r % ROWS
    g = r % G
    t = r // G
    offs_s = tl.arange(0, SPLIT_P2)
    offs_d = tl.arange(0, D)
    split_ok = offs_s < n_split
    part = tl.cast((bk * n_row_groups + pid_r) * n_split + offs_s, tl.int64) * ROWS + row
    lse = tl.load(LSE_PART + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.math.exp2(lse - top)
    o_part = tl.load(O_PART + part[:, None] * D + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    o = tl.sum(o_part * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + tl.cast(b, tl.int64) * stride_ob + t * stride_ot + (kvh * G + g) * stride_oh + offs_d,
             _cast(o, O.dtype.element_ty, INTERPRET))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    window: int | None,
    sinks: int,
    chunk: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    programs_per_sm: int | None = None,
) -> torch.Tensor:
    """q: (B, Tq, H, D), caches (B, Smax, Hkv, D), lengths (B, Hkv) int32 -> o (B, Tq, H, D).

    ``chunk`` (keys per split, a multiple of ``block_n``) defaults to ``programs_per_sm``
    programs per multiprocessor: 2 (a single wave) when the (batch, KV head) pairs are fewer than
    the multiprocessors, else 4 (several waves, so the last one is a small part). H200 sweep
    (block_n 64, 4 warps, 3 stages), TB/s of KV read at (B, L) = (1, 128k) / (8, 32k) / (64, 4k):
    2 per SM 4.19 / 4.07 / 3.87, 4 per SM 3.66 / 3.98 / 4.18.
    """
    b, tq, h, d = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    g = h // hkv
    interpret = interpreting()
    if block_n is None:
        block_n = 32 if interpret else 64
    rows_needed = g * tq
    rows = max(16, triton.next_power_of_2(min(rows_needed, 64)))
    n_row_groups = triton.cdiv(rows_needed, rows)
    if chunk is None:
        sms = _sm_count(q.device)
        if programs_per_sm is None:
            programs_per_sm = 2 if b * hkv * n_row_groups < sms else 4
        target = programs_per_sm * sms
        n_split = max(1, min(triton.cdiv(target, b * hkv * n_row_groups), triton.cdiv(smax, 256)))
        chunk = triton.cdiv(triton.cdiv(smax, n_split), block_n) * block_n
    chunk = max(block_n, chunk)
    n_split = max(1, triton.cdiv(smax, chunk))
    o_part = kernels.new_buffer((b * hkv * n_row_groups, n_split, rows, d), q, torch.float32)
    lse_part = kernels.new_buffer((b * hkv * n_row_groups, n_split, rows), q, torch.float32)
    has_window = window is not None
    decode_fwd_kernel[(n_split, b * hkv, n_row_groups)](
        q, k_cache, v_cache, lengths, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        lengths.stride(0), lengths.stride(1),
        tq, hkv, g, n_split, n_row_groups, chunk, scale * LOG2E,
        # Clamped like attention's windows (int32 position arithmetic); NO_WINDOW is past any cache.
        min(int(window), NO_WINDOW) if has_window else NO_WINDOW, sinks,
        D=d, ROWS=rows, BLOCK_N=block_n, HAS_WINDOW=has_window,
        num_warps=num_warps, num_stages=1 if interpret else num_stages,
    )
    o = kernels.new_buffer(q.shape, q)
    decode_reduce_kernel[(b * hkv, rows_needed)](
        o_part, lse_part, o,
        o.stride(0), o.stride(1), o.stride(2),
        tq, hkv, g, n_split, n_row_groups,
        D=d, ROWS=rows, SPLIT_P2=triton.next_power_of_2(n_split),
        num_warps=4 if d >= 128 else 2,
    )
    return o
