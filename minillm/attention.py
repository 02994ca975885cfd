"""The model's one attention call, dispatched to the fastest backend that can express the mask.

    out = attention(q, k, v, q_doc=None, k_doc=None, backend="auto", announce=False)

q [B, H, T, hd]; k, v [B, Hkv, S, hd] with Hkv dividing H (grouped-query attention: query head h
reads K/V head h // (H / Hkv)), S >= T. Causal, aligned bottom-right: query i sits at absolute
position S - T + i, so the same call serves training (S == T) and KV-cache decoding (S > T).
q_doc [B, T] / k_doc [B, S] are integer document ids (None: plain causal). Query i attends to
key j iff pos(j) <= pos(i) and, with document ids, q_doc[i] == k_doc[j]. Returns [B, H, T, hd] in
q's dtype. A row with no visible key (impossible when a token's own document includes itself)
comes out as zeros from math and triton, never NaN (sdpa: whatever PyTorch does; zeros on CPU).

Backends
  'triton'  minillm/kernels/triton_attention.py, FlashAttention-2 with document blocks skipped.
            CUDA tensors (or CPU under TRITON_INTERPRET=1, for the tests), S == T, head dim
            16/32/64/128, fp16/bf16/fp32.
  'sdpa'    torch.nn.functional.scaled_dot_product_attention: the is_causal fast path when there
            are no document ids and S == T, otherwise a boolean mask.
  'math'    plain PyTorch, scores in fp32: the reference the tests compare everything with.
The model passes its config.attn_backend (the scripts' --attn). 'auto': triton for CUDA tensors when it
is importable and supports the call, else sdpa (which every supported torch has; math only when asked
for). With announce=True (the model's calls) every distinct choice is printed once on rank 0, e.g.
"attention: sdpa (cpu tensors; triton is for CUDA)".
A forced 'triton' raises if triton is missing or the tensors are on CPU without the interpreter,
and falls back to sdpa (printed once) for calls the kernel does not cover, such as KV-cache
decoding (S > T) or an unsupported head dim.
"""
import os

import torch
import torch.nn.functional as F

from minillm.kernels import load_triton_attention, triton_interpreting, triton_status

BACKENDS = ("auto", "triton", "sdpa", "math")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# enable_gqa arrived in torch 2.5; older versions get K/V repeated per query head.
SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

_announced: set = set()  # (backend, reason) pairs already printed
_triton_status: tuple[bool, str] | None = None  # cached: importing triton costs about a second


# ------------------------------------------------------------------------------------------ masks
def visibility_mask(T: int, S: int, q_doc=None, k_doc=None, device=None):
    """Boolean [B or 1, 1, T, S]: True where query i may attend to key j (causal bottom-right,
    same document)."""
    q_pos = torch.arange(S - T, S, device=device)
    k_pos = torch.arange(S, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if q_doc is not None:
        mask = mask & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return mask


# ---------------------------------------------------------------------------------------- backends
def math_attention(q, k, v, q_doc=None, k_doc=None):
    """softmax(Q K^T / sqrt(hd) + mask) V with the scores in fp32; the test oracle."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    # The G query heads of each K/V head stacked along the rows: K/V are shared, never copied.
    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = (qg @ k.float().transpose(-1, -2)).view(B, Hkv, G, T, S) * D ** -0.5
    mask = visibility_mask(T, S, q_doc, k_doc, q.device)[:, :, None]  # [B|1, 1, 1, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    if q_doc is not None:
        # A row with no visible key would be softmax(all -inf) = NaN (in backward too): give it
        # finite scores, then zero its probabilities, so it outputs 0 with 0 gradient.
        has_key = mask.any(-1, keepdim=True)
        probs = scores.masked_fill(~has_key, 0.0).softmax(-1) * has_key
    else:
        probs = scores.softmax(-1)  # causal with S >= T: every query sees at least itself
    out = probs.reshape(B, Hkv, G * T, S) @ v.float()  # [B, Hkv, G * T, D]
    return out.reshape(B, H, T, D).to(q.dtype)


def sdpa_attention(q, k, v, q_doc=None, k_doc=None):
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient / CPU kernels)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if gqa and not SDPA_HAS_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if q_doc is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q_doc is None and T == 1:  # one decoding step without documents sees every cached key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = visibility_mask(T, S, q_doc, k_doc, q.device)
    if gqa and q.is_cuda:
        # CUDA's masked kernels (memory-efficient, cuDNN) take no GQA and enable_gqa would drop to
        # the math kernel's [B, H, T, S] scores; repeating K/V costs far less.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def decode_attention(q, k, v, visible, backend: str = "auto"):
    """One decoding step over a static KV cache: q [B, H, 1, hd], k/v [B, Hkv, S, hd] (the cache's whole
    width), visible [B, S] bool (the columns this row's token may see). The same as attention() with the
    visible columns as one document, without its per-call checks and backend choice (plain Python a
    compiled step would break its graph on; no Triton kernel covers S > T anyway): math when asked for,
    else sdpa with the mask built once per step by the caller."""
    if backend == "math":
        doc = visible.long()
        return math_attention(q, k, v, q_doc=doc[:, -1:].clone().fill_(1), k_doc=doc)
    mask = visible[:, None, None, :]
    gqa = q.shape[1] != k.shape[1]
    if gqa and (q.is_cuda or not SDPA_HAS_GQA):  # as in sdpa_attention: no GQA in CUDA's masked kernels
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def triton_attention(q, k, v, q_doc=None, k_doc=None):
    return load_triton_attention().flash_attention(q, k, v, q_doc, k_doc)


# --------------------------------------------------------------------------------------- dispatch
def _announce(backend: str, reason: str):
    """Print each distinct (backend, reason) once, on rank 0 only."""
    if (backend, reason) in _announced:
        return
    _announced.add((backend, reason))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"attention: {backend} ({reason})", flush=True)


def _cached_triton_status() -> tuple[bool, str]:
    global _triton_status
    if _triton_status is None:
        _triton_status = triton_status()
    return _triton_status


def _triton_call_unsupported(q, k, v) -> str | None:
    """Why the Triton kernel cannot take this call (shape, dtype), or None when it can."""
    if q.shape[2] != k.shape[2]:
        return "query length != key length (KV cache)"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {TRITON_HEAD_DIMS}"
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}"
    return None


def _triton_device_problem(q) -> str | None:
    """Why Triton cannot run on q's device at all (a configuration error when forced)."""
    if q.is_cuda:
        return None
    if q.device.type == "cpu" and triton_interpreting():
        module = load_triton_attention()
        if not module.INTERPRETED:
            return "TRITON_INTERPRET=1 was set after the kernels were compiled for the GPU"
        return None
    return f"{q.device.type} tensors (needs CUDA, or TRITON_INTERPRET=1 for Triton's CPU interpreter)"


def choose_backend(q, k, v, requested: str = "auto") -> tuple[str, str]:
    """(backend, reason) for this call."""
    if requested in ("sdpa", "math"):
        return requested, "requested"
    if requested == "triton":
        ok, why = _cached_triton_status()
        if not ok:
            raise RuntimeError(f"attention backend 'triton' requested but {why} (pip install triton)")
        problem = _triton_device_problem(q)
        if problem:
            raise RuntimeError(f"attention backend 'triton' requested but {problem}")
        unsupported = _triton_call_unsupported(q, k, v)
        if unsupported:
            return "sdpa", f"triton requested; {unsupported}"
        return "triton", "requested"
    # auto
    if not q.is_cuda:
        return "sdpa", f"{q.device.type} tensors; triton is for CUDA"
    ok, why = _cached_triton_status()
    if not ok:
        return "sdpa", why
    if load_triton_attention().INTERPRETED:  # TRITON_INTERPRET=1 in a GPU process: far too slow
        return "sdpa", "TRITON_INTERPRET=1: triton kernels are interpreted"
    unsupported = _triton_call_unsupported(q, k, v)
    if unsupported:
        return "sdpa", unsupported
    return "triton", "CUDA, triton available"


def _check_inputs(q, k, v, q_doc, k_doc):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q must be [B,H,T,hd], k/v [B,Hkv,S,hd]; got q {tuple(q.shape)} "
                         f"k {tuple(k.shape)} v {tuple(v.shape)}")
    (B, H, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or H % Hkv or S < T:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} do not fit "
                         "(same batch and head dim, Hkv dividing H, S >= T)")
    if q_doc is not None and tuple(q_doc.shape) != (B, T):
        raise ValueError(f"attention: q_doc must be [B, T] = {(B, T)}, got {tuple(q_doc.shape)}")
    if k_doc is not None and tuple(k_doc.shape) != (B, S):
        raise ValueError(f"attention: k_doc must be [B, S] = {(B, S)}, got {tuple(k_doc.shape)}")


def attention(q, k, v, q_doc=None, k_doc=None, backend: str = "auto", announce: bool = False):
    """Causal (document-masked) attention; see the module docstring for shapes and backends."""
    _check_inputs(q, k, v, q_doc, k_doc)
    T, S = q.shape[2], k.shape[2]
    # One side of the document ids implies the other: both describe the same tokens.
    if q_doc is not None and k_doc is None:
        if S != T:
            raise ValueError("attention: q_doc given without k_doc while S != T (KV cache): pass both")
        k_doc = q_doc
    elif k_doc is not None and q_doc is None:
        q_doc = k_doc[:, S - T:]
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (choose from {', '.join(BACKENDS)})")
    chosen, reason = choose_backend(q, k, v, backend)
    if announce:
        _announce(chosen, reason)
    if chosen == "triton":
        return triton_attention(q, k, v, q_doc, k_doc)
    if chosen == "sdpa":
        return sdpa_attention(q, k, v, q_doc, k_doc)
    return math_attention(q, k, v, q_doc, k_doc)
