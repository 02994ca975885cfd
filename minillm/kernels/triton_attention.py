"""FlashAttention-2 in Triton: causal, grouped-query, with document masking for packed rows.

    out = flash_attention(q, k, v, q_doc=None, k_doc=None)   # q [B,H,T,D], k/v [B,Hkv,T,D]

Algorithm (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning"). Forward: one program per (query block, batch*head) streams the key/value blocks
through SRAM with an online softmax (running max m, running sum l, rescaled accumulator) and writes
the output plus the log-sum-exp L = m + log2(l) of every row. Backward recomputes the probabilities
P = exp2(S - L) from L instead of storing them: one kernel per key block accumulates dK, dV (over all
query heads that share the K/V head, so GQA needs no atomics), another per query block accumulates
dQ; D = rowsum(dO * O) is precomputed. Scores are kept in log2 units (scale * log2(e) folded into
Q K^T) so every exponential is an exp2.

Masking. A query at position i sees key j iff j <= i and doc[j] == doc[i]. Each program visits only
key (or query) blocks that can hold a visible pair and splits them in three runs:
    [start, full_start)   partly visible blocks: the element mask is applied
    [full_start, full_end) blocks fully visible to every query of the block: no mask work at all
    [full_end, end)        partly visible blocks near the diagonal / the document's end: masked
Blocks of other documents are SKIPPED, never loaded. This relies on the packing layout, documents
back to back in a row, i.e. doc ids non-decreasing along the row. Then the key range a query can see
starts at kv_lo[i] = first key of its document (a searchsorted on the doc ids), and the query range
that can see key j ends at q_hi[j] = first query past j's document. Both are computed on the device
per call (no host sync). For a row whose doc ids are NOT non-decreasing (or whose q_doc differs from
k_doc) the tables fall back to "everything causal, everything masked": still exact, just no skipping.

Limits: T == S (no KV cache; the dispatcher sends decoding to SDPA), head dim 16/32/64/128, doc ids
must fit in int32, per-head offsets T * row stride must fit in int32 (batch and head offsets are
int64).

Triton decides when a kernel is defined whether it is compiled or interpreted (TRITON_INTERPRET=1:
Triton's CPU interpreter, used by the tests); INTERPRETED records which one this import got.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
# Block sizes when not autotuning (interpreter, or an explicit block_sizes argument): small, so the
# interpreter's tests cross many block boundaries at tiny sequence lengths.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}


# Helpers called from inside the kernels. Compiled, they are inlined into the kernel. Under the
# interpreter they run as plain Python: calling an interpreted @triton.jit helper re-patches all of
# triton.language (~0.5 ms a call), which would otherwise dominate the CPU tests.
_device_fn = (lambda fn: fn) if INTERPRETED else triton.jit


# --------------------------------------------------------------------------------------- forward
@_device_fn
def _mm(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc). PRECISION "upcast": the operands go to fp32 first, for bf16 under the
    interpreter, whose bf16 tl.dot returns garbage (Triton 3.9; numpy has no bfloat16). Products of
    bf16 values are exact in fp32, so this matches the GPU's bf16 MMA with fp32 accumulation."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@_device_fn
def _fwd_blocks(acc, l_i, m_i, q, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                start, end, offs_m, offs_n0, offs_d, T, qk_scale,
                MASKED: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """Online-softmax update of one query block with key blocks [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        in_bounds = offs_n < T
        if MASKED:
            kT = tl.load(K_head + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_bounds[None, :], other=0.0)
        else:  # full blocks lie wholly inside the sequence
            kT = tl.load(K_head + offs_n[None, :] * stride_kt + offs_d[:, None])
        qk = _mm(q, kT, None, PRECISION) * qk_scale
        if MASKED:
            keep = (offs_n[None, :] <= offs_m[:, None]) & in_bounds[None, :]
            if HAS_DOC:
                k_doc = tl.load(KDOC_row + offs_n, mask=in_bounds, other=-1)
                keep = keep & (q_doc[:, None] == k_doc[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far has m = -inf; subtract 0 then, so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V_head + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_bounds[:, None], other=0.0)
        else:
            v = tl.load(V_head + offs_n[:, None] * stride_vt + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = _mm(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QDOC, KDOC, KVLO, MONO, qk_scale, T, H, GROUP, T_BUCKET,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    # Query blocks with the most keys (the causal diagonal's far end) launch first: a shorter tail.
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    K_head = K + b * stride_kb + (h // GROUP) * stride_kh
    V_head = V + b * stride_vb + (h // GROUP) * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < T, other=0.0)

    end = tl.minimum(m0 + BLOCK_M, T)  # causal: keys past the block's last query are never visible
    full_end = ((m0 + 1) // BLOCK_N) * BLOCK_N  # key blocks before this lie at/below every query
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * T + offs_m, mask=offs_m < T, other=-2)
        kv_first = tl.load(KVLO + b * T + m0)  # first key of the block's first (earliest) document
        kv_last = tl.load(KVLO + b * T + end - 1)  # first key of its last document
        start = (kv_first // BLOCK_N) * BLOCK_N
        full_start = tl.cdiv(kv_last, BLOCK_N) * BLOCK_N
        full_start = tl.where(tl.load(MONO + b) != 0, full_start, end)  # unsorted row: mask all
    else:
        q_doc = offs_m
        start = m0 * 0
        full_start = m0 * 0
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    full_end = tl.maximum(full_end, full_start)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    KDOC_row = KDOC + b * T
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                                start, full_start, offs_m, offs_n0, offs_d, T, qk_scale,
                                True, HAS_DOC, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                                full_start, full_end, offs_m, offs_n0, offs_d, T, qk_scale,
                                False, HAS_DOC, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                                full_end, end, offs_m, offs_n0, offs_d, T, qk_scale,
                                True, HAS_DOC, BLOCK_N, PRECISION)
    # A row that saw no key (impossible for causal + own document, but be safe) outputs 0 and
    # gets L = +inf, which makes every recomputed probability of it exactly 0 in backward.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# -------------------------------------------------------------------------------------- backward
@_device_fn
def _dkdv_blocks(dk, dv, k, v, k_doc, Q_head, DO_head, LSE_head, DELTA_head, QDOC_row, stride_qt, stride_dot,
                 start, end, offs_n, offs_m0, offs_d, T, qk_scale,
                 MASKED: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key block from query blocks [start, end) of one query head (transposed tiles)."""
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + offs_m0
        in_bounds = offs_m < T
        if MASKED:
            qT = tl.load(Q_head + offs_m[None, :] * stride_qt + offs_d[:, None], mask=in_bounds[None, :], other=0.0)
            do = tl.load(DO_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=in_bounds[:, None], other=0.0)
        else:
            qT = tl.load(Q_head + offs_m[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(DO_head + offs_m[:, None] * stride_dot + offs_d[None, :])
        lse = tl.load(LSE_head + offs_m, mask=in_bounds, other=float("inf"))
        delta = tl.load(DELTA_head + offs_m, mask=in_bounds, other=0.0)
        pT = tl.exp2(_mm(k, qT, None, PRECISION) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            keep = (offs_m[None, :] >= offs_n[:, None]) & in_bounds[None, :]
            if HAS_DOC:
                q_doc = tl.load(QDOC_row + offs_m, mask=in_bounds, other=-2)
                keep = keep & (k_doc[:, None] == q_doc[None, :])
            pT = tl.where(keep, pT, 0.0)
        dv = _mm(pT.to(do.dtype), do, dv, PRECISION)
        dpT = _mm(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = _mm(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, QDOC, KDOC, QHI, MONO, qk_scale, sm_scale,
                   T, H, HKV, GROUP, T_BUCKET,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = (bh % HKV).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=valid, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=valid, other=0.0)

    start = (n0 // BLOCK_M) * BLOCK_M  # causal: queries before the block's first key see none of it
    full_start = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # query blocks from here see every key
    if HAS_DOC:
        k_doc = tl.load(KDOC + b * T + offs_n, mask=offs_n < T, other=-1)
        end = tl.load(QHI + b * T + tl.minimum(n0 + BLOCK_N, T) - 1)  # past the last key's document
        full_end = (tl.load(QHI + b * T + n0) // BLOCK_M) * BLOCK_M  # before the first key's doc ends
        full_end = tl.where(tl.load(MONO + b) != 0, full_end, start)  # unsorted row: mask all
    else:
        k_doc = offs_n
        end = n0 * 0 + T
        full_end = (T // BLOCK_M) * BLOCK_M
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    full_end = tl.maximum(full_end, full_start)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    QDOC_row = QDOC + b * T
    for g in range(GROUP):  # every query head reading this K/V head
        h = hk * GROUP + g
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        LSE_head = LSE + (b * H + h) * T
        DELTA_head = DELTA + (b * H + h) * T
        dk, dv = _dkdv_blocks(dk, dv, k, v, k_doc, Q_head, DO_head, LSE_head, DELTA_head, QDOC_row, stride_qt,
                              stride_dot, start, full_start, offs_n, offs_m0, offs_d, T, qk_scale,
                              True, HAS_DOC, BLOCK_M, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, k_doc, Q_head, DO_head, LSE_head, DELTA_head, QDOC_row, stride_qt,
                              stride_dot, full_start, full_end, offs_n, offs_m0, offs_d, T, qk_scale,
                              False, HAS_DOC, BLOCK_M, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, k_doc, Q_head, DO_head, LSE_head, DELTA_head, QDOC_row, stride_qt,
                              stride_dot, full_end, end, offs_n, offs_m0, offs_d, T, qk_scale,
                              True, HAS_DOC, BLOCK_M, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=valid)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=valid)


@_device_fn
def _dq_blocks(dq, q, do, lse, delta, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
               start, end, offs_m, offs_n0, offs_d, T, qk_scale,
               MASKED: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one query block from key blocks [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        in_bounds = offs_n < T
        if MASKED:
            kT = tl.load(K_head + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_bounds[None, :], other=0.0)
            vT = tl.load(V_head + offs_n[None, :] * stride_vt + offs_d[:, None], mask=in_bounds[None, :], other=0.0)
        else:
            kT = tl.load(K_head + offs_n[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(V_head + offs_n[None, :] * stride_vt + offs_d[:, None])
        p = tl.exp2(_mm(q, kT, None, PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = (offs_n[None, :] <= offs_m[:, None]) & in_bounds[None, :]
            if HAS_DOC:
                k_doc = tl.load(KDOC_row + offs_n, mask=in_bounds, other=-1)
                keep = keep & (q_doc[:, None] == k_doc[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _mm(do, vT, None, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mm(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, QDOC, KDOC, KVLO, MONO, qk_scale, sm_scale, T, H, GROUP, T_BUCKET,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m[:, None] < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=valid, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=valid, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    K_head = K + b * stride_kb + (h // GROUP) * stride_kh
    V_head = V + b * stride_vb + (h // GROUP) * stride_vh

    # The same key ranges as the forward pass.
    end = tl.minimum(m0 + BLOCK_M, T)
    full_end = ((m0 + 1) // BLOCK_N) * BLOCK_N
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * T + offs_m, mask=offs_m < T, other=-2)
        start = (tl.load(KVLO + b * T + m0) // BLOCK_N) * BLOCK_N
        full_start = tl.cdiv(tl.load(KVLO + b * T + end - 1), BLOCK_N) * BLOCK_N
        full_start = tl.where(tl.load(MONO + b) != 0, full_start, end)
    else:
        q_doc = offs_m
        start = m0 * 0
        full_start = m0 * 0
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    full_end = tl.maximum(full_end, full_start)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    KDOC_row = KDOC + b * T
    dq = _dq_blocks(dq, q, do, lse, delta, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                    start, full_start, offs_m, offs_n0, offs_d, T, qk_scale, True, HAS_DOC, BLOCK_N, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                    full_start, full_end, offs_m, offs_n0, offs_d, T, qk_scale, False, HAS_DOC, BLOCK_N, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, q_doc, K_head, V_head, KDOC_row, stride_kt, stride_vt,
                    full_end, end, offs_m, offs_n0, offs_d, T, qk_scale, True, HAS_DOC, BLOCK_N, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------------- autotuning
# On a GPU the tiles are autotuned per (head dim, length bucket, masking, GQA group, dtype) among a
# few candidates per head dim; configs that do not fit (shared memory) are dropped by the autotuner.
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The candidates were chosen without a GPU at hand, by
# compiling every kernel for sm_90 (bf16, document masking on) and keeping the tiles with the least
# register spilling reported by ptxas, plus the FlashAttention-2 tutorial's usual large tiles.
# TODO(GPU): re-check these lists on an H100 with bench/bench_attention.py.
_CANDIDATES = {
    "fwd": {128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
            64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
            32: [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
    # dK/dV: BLOCK_N keys per program, BLOCK_M query rows per step.
    "dkdv": {128: [(64, 32, 4, 3), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
             64: [(32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
             32: [(32, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 3)]},
    "dq": {128: [(32, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 3)],
           64: [(128, 64, 8, 3), (128, 32, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
           32: [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3)]},
}
_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "HAS_DOC", "GROUP"]


def _tuned(kernel, name):
    """`kernel` autotuned over _CANDIDATES[name] for the call's head dim (16 uses the 32 list)."""
    tiles = _CANDIDATES[name]
    union = sorted({t for ts in tiles.values() for t in ts})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in union]

    def for_head_dim(configs, named_args, **kwargs):
        wanted = set(tiles[max(32, kwargs["HEAD_DIM"])])
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return triton.autotune(configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": for_head_dim})(kernel)


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_TUNED = {} if INTERPRETED else {name: _tuned(kernel, name) for name, kernel in _KERNELS.items()}


def _launch(name, blocks, grid_rows, grid_cols, args, meta):
    """Run kernel `name` ("fwd", "dkdv", "dq") with tiles `blocks` = (BLOCK_M, BLOCK_N), or autotuned
    when blocks is None (GPU). Programs tile grid_rows by BLOCK_M (BLOCK_N for dkdv) x grid_cols."""
    rows_key = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    if blocks is None and INTERPRETED:
        blocks = INTERPRETER_BLOCKS[name]
    if blocks is not None:
        tiles = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
        _KERNELS[name][(triton.cdiv(grid_rows, tiles[rows_key]), grid_cols)](*args, **tiles, **meta)
    else:
        _TUNED[name][lambda cfg: (triton.cdiv(grid_rows, cfg[rows_key]), grid_cols)](*args, **meta)


# ----------------------------------------------------------------------------------- host side
def doc_tables(q_doc, k_doc, T: int):
    """Per-row skipping tables for packed documents, computed on the device (no host sync).

    Returns (q_doc, k_doc) as contiguous int32, kv_lo [B,T] (first key of query i's document),
    q_hi [B,T] (one past the last query of key j's document) and mono [B] (1 where the row's doc
    ids are non-decreasing and q_doc == k_doc, i.e. the tables are valid; elsewhere kv_lo = 0,
    q_hi = T and the kernels mask every block instead of skipping).
    """
    q_doc = q_doc.to(torch.int32).contiguous()
    k_doc = k_doc.to(torch.int32).contiguous()
    mono = ((q_doc[:, 1:] >= q_doc[:, :-1]).all(1) & (k_doc[:, 1:] >= k_doc[:, :-1]).all(1)
            & (q_doc == k_doc).all(1))
    # searchsorted needs sorted rows; on the other rows its answer is discarded by the where.
    kv_lo = torch.searchsorted(k_doc, q_doc, side="left", out_int32=True)
    q_hi = torch.searchsorted(q_doc, k_doc, side="right", out_int32=True)
    kv_lo = torch.where(mono[:, None], kv_lo, torch.zeros_like(kv_lo)).contiguous()
    q_hi = torch.where(mono[:, None], q_hi, torch.full_like(q_hi, T)).contiguous()
    return q_doc, k_doc, kv_lo, q_hi, mono.to(torch.int32).contiguous()


def _meta(q, head_dim, has_doc):
    if q.dtype != torch.float32:
        # 16-bit operands: tensor-core MMA with fp32 accumulation whatever the precision flag says,
        # except bf16 in the interpreter, whose bf16 dot is wrong (see _mm).
        precision = "upcast" if INTERPRETED and q.dtype == torch.bfloat16 else "tf32"
    elif q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # fp32 inputs follow torch's own fp32 matmul setting
    else:
        precision = "ieee"
    return {"HEAD_DIM": head_dim, "HAS_DOC": has_doc, "PRECISION": precision}


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, tables, has_doc, sm_scale, blocks):
    B, H, T, D = q.shape
    # Output laid out [B, T, H, D] and returned as its [B, H, T, D] view: the model's
    # out.transpose(1, 2).reshape(B, T, H * D) is then free.
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    q_doc, k_doc, kv_lo, _, mono = tables
    args = (q, k, v, o, lse, q_doc, k_doc, kv_lo, mono, sm_scale * LOG2E, T, H, H // k.shape[1],
            triton.next_power_of_2(T),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    _launch("fwd", blocks and blocks.get("fwd"), T, B * H, args, _meta(q, D, has_doc))
    return o, lse


def _backward(do, q, k, v, o, lse, tables, has_doc, sm_scale, blocks):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    do = _last_dim_contiguous(do)
    delta = (o.float() * do.float()).sum(-1).contiguous()  # D_i = rowsum(dO * O), [B, H, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    q_doc, k_doc, kv_lo, q_hi, mono = tables
    meta = _meta(q, D, has_doc)
    qk_scale, bucket = sm_scale * LOG2E, triton.next_power_of_2(T)
    _launch("dkdv", blocks and blocks.get("dkdv"), T, B * Hkv,
            (q, k, v, do, dk, dv, lse, delta, q_doc, k_doc, q_hi, mono, qk_scale, sm_scale, T, H, Hkv, H // Hkv,
             bucket, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
             *dv.stride()[:3]), meta)
    _launch("dq", blocks and blocks.get("dq"), T, B * H,
            (q, k, v, do, dq, lse, delta, q_doc, k_doc, kv_lo, mono, qk_scale, sm_scale, T, H, H // Hkv, bucket,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3]), meta)
    return dq, dk, dv


# The kernels as two PyTorch custom operators with an autograd formula, rather than an
# autograd.Function: torch.compile then treats them as opaque calls (it never traces into the launch
# code), and selective activation checkpointing (minillm/model.py) can see the forward as one op and
# keep its output instead of rerunning the kernel. block_sizes travel as a flat list of six ints
# ([] = autotune / interpreter defaults); the document tables are recomputed in backward (two
# searchsorted calls over [B, T], negligible next to the kernels).
def _blocks_dict(blocks: list[int]):
    return dict(zip(("fwd", "dkdv", "dq"), zip(blocks[0::2], blocks[1::2]))) if blocks else None


def _tables(q, q_doc, k_doc):
    if q_doc is not None:
        return doc_tables(q_doc, k_doc, q.shape[2])
    return (torch.zeros(1, dtype=torch.int32, device=q.device),) * 5  # never read without HAS_DOC


@torch.library.custom_op("minillm::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_doc: Optional[torch.Tensor],
                        k_doc: Optional[torch.Tensor], sm_scale: float, blocks: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _forward(q, k, v, _tables(q, q_doc, k_doc), q_doc is not None, sm_scale, _blocks_dict(blocks))


@_flash_attention_op.register_fake
def _(q, k, v, q_doc, k_doc, sm_scale, blocks):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("minillm::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, q_doc: Optional[torch.Tensor],
                                 k_doc: Optional[torch.Tensor], sm_scale: float, blocks: list[int]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _backward(do, q, k, v, o, lse, _tables(q, q_doc, k_doc), q_doc is not None, sm_scale,
                     _blocks_dict(blocks))


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, q_doc, k_doc, sm_scale, blocks):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, q_doc, k_doc, sm_scale, blocks = inputs
    ctx.save_for_backward(q, k, v, *output, q_doc, k_doc)
    ctx.sm_scale, ctx.blocks = sm_scale, blocks


def _backward_formula(ctx, do, _dlse):
    q, k, v, o, lse, q_doc, k_doc = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward_op(do, q, k, v, o, lse, q_doc, k_doc, ctx.sm_scale, ctx.blocks)
    return dq, dk, dv, None, None, None, None


_flash_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def flash_attention(q, k, v, q_doc=None, k_doc=None, sm_scale=None, block_sizes=None):
    """Causal (optionally document-masked) attention; q [B,H,T,D], k/v [B,Hkv,T,D], docs [B,T] ints.

    D in {16, 32, 64, 128}; fp16 / bf16 / fp32; T == S (training; no KV cache). block_sizes
    {"fwd": (BLOCK_M, BLOCK_N), "dkdv": (...), "dq": (...)} pins the tiles (tests, benchmarks);
    default: autotuned on a GPU, INTERPRETER_BLOCKS under TRITON_INTERPRET=1.
    """
    _, H, T, D = q.shape
    if k.shape[2] != T or k.shape != v.shape or H % k.shape[1] or D not in (16, 32, 64, 128):
        raise ValueError(f"flash_attention: unsupported shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} (needs T == S, Hkv | H, head dim 16/32/64/128)")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("flash_attention: give both q_doc and k_doc, or neither")
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    blocks = [n for name in ("fwd", "dkdv", "dq") for n in block_sizes[name]] if block_sizes else []
    return _flash_attention_op(q, k, v, q_doc, k_doc, float(sm_scale), blocks)[0]
