"""Attention dispatch (interim version by the lead; the attention helper replaces this file with
the full dispatcher + Triton kernel). Same interface: attention(q, k, v, q_doc, k_doc, backend)."""
import math

import torch
import torch.nn.functional as F

_backend = "auto"


def set_attention_backend(name: str):
    global _backend
    if name not in ("auto", "triton", "sdpa", "math"):
        raise ValueError(f"unknown attention backend {name!r} (auto, triton, sdpa, math)")
    _backend = name


def _mask(q, k, q_doc, k_doc):
    T, S = q.shape[2], k.shape[2]
    q_pos = torch.arange(S - T, S, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None]
    mask = (k_pos <= q_pos)[None, None]
    if q_doc is not None:
        mask = mask & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return mask


def attention(q, k, v, q_doc=None, k_doc=None, backend=None):
    backend = backend or _backend
    if backend in ("auto", "sdpa", "triton"):
        if q_doc is None and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(q, k, q_doc, k_doc), enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~_mask(q, k, q_doc, k_doc), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
