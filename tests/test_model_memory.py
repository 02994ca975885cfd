"""The model's memory and speed paths compute exactly what the plain formulas compute, with less memory.

    cd /work/main && .venv/bin/python -m pytest -q tests/test_model_memory.py

- RMSNorm and SwiGLU's silu(a) * b have hand-written backwards (minillm/model.py) so that autograd keeps
  fewer tensors: checked against autograd of the plain formula (float64 gradcheck, fp32 and bf16
  gradients) and by counting the bytes each keeps for backward.
- Activation checkpointing none / selective / full: the same loss and gradients, and less kept memory
  in that order (counted by `LiveBytes`, which follows every storage the ops create until it is freed;
  saved-tensor hooks would not see inside a checkpoint, which installs hooks of its own).
- torch.compile of the blocks (the scripts' --compile): same loss and gradients as eager, and dynamo
  really compiled a graph.
"""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minillm.model import FeedForward, Llama, LlamaConfig, RMSNorm, _RMSNormFunction, _SiluMulFunction


def plain_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_silu_mul(a, b):
    return F.silu(a) * b


def grads(fn, inputs, upstream):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, upstream)]


def test_rms_norm_backward_gradcheck():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))


def test_silu_mul_backward_gradcheck():
    a = torch.randn(4, 24, dtype=torch.float64, requires_grad=True) * 3
    b = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluMulFunction.apply, (a.detach().requires_grad_(), b))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lean_functions_match_autograd_of_plain_formulas(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 32, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(32, generator=gen)).to(dtype)
    g = torch.randn(2, 7, 32, generator=gen).to(dtype)
    got = grads(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), [x, w], g)
    want = grads(lambda x, w: plain_rms_norm(x, w, 1e-5), [x, w], g)
    for name, a, b in zip(["out", "dx", "dw"], got, want):
        assert a.dtype == b.dtype, name
        assert (a.float() - b.float()).norm() / b.float().norm() < tol, name
    a_in, b_in = (3 * torch.randn(2, 7, 48, generator=gen)).to(dtype), torch.randn(2, 7, 48, generator=gen).to(dtype)
    g = torch.randn(2, 7, 48, generator=gen).to(dtype)
    for name, a, b in zip(["out", "da", "db"], grads(_SiluMulFunction.apply, [a_in, b_in], g),
                          grads(plain_silu_mul, [a_in, b_in], g)):
        assert (a.float() - b.float()).norm() / b.float().norm() < tol, name


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates inside this mode for as long as it lives, so
    after a forward pass `total()` is the activation memory autograd (or a checkpoint) holds for
    backward, plus the output. Each storage is counted once and dropped when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # views are not new memory
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        return out

    def total(self) -> int:
        gc.collect()
        return sum(self.live.values())


def kept_bytes(fn, *inputs) -> int:
    """What running fn(*inputs) leaves alive: its output and what it keeps for backward."""
    with LiveBytes() as live:
        out = fn(*inputs)
    total = live.total()
    del out
    return total


def test_lean_norm_and_swiglu_keep_less_for_backward():
    T, dim, hidden = 64, 32, 96
    x = torch.randn(T, dim, requires_grad=True)
    norm = RMSNorm(dim, 1e-5)
    out = T * dim * 4
    assert kept_bytes(norm, x) == out + T * 4  # the output and 1/rms per token
    assert kept_bytes(lambda x: plain_rms_norm(x, norm.weight, 1e-5), x) == 2 * out + T * 4  # ... and x/rms
    ffn = FeedForward(LlamaConfig(dim=dim, hidden_dim=hidden, n_heads=4, n_layers=1, vocab_size=8))
    # w1 x, w3 x and their product (w2's input) + the output; autograd would also keep silu(w1 x)
    assert kept_bytes(ffn, x) == 3 * T * hidden * 4 + out
    assert kept_bytes(lambda x: ffn.w2(plain_silu_mul(ffn.w1(x), ffn.w3(x))), x) == 4 * T * hidden * 4 + out


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=96, n_layers=3))


def loss_and_grads(model, ids, doc_ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids, doc_ids=doc_ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 48), generator=gen)
    doc_ids = torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 28, dtype=torch.long)], dim=1)
    return ids, doc_ids


def test_checkpointing_modes_same_gradients_less_memory():
    model = tiny_model()
    ids, doc_ids = batch()
    ref_loss, ref_grads = loss_and_grads(model, ids, doc_ids)
    kept = {}
    for mode in ("none", "selective", "full"):
        model.config.activation_checkpointing = mode
        loss, got = loss_and_grads(model, ids, doc_ids)
        assert torch.allclose(loss, ref_loss, rtol=1e-6), mode
        for name, g in got.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-5, atol=1e-7), (mode, name)
        kept[mode] = kept_bytes(lambda: model.hidden_states(ids, doc_ids=doc_ids))
    # full keeps each block's input only; selective keeps the matmul and attention outputs
    assert kept["full"] < 0.5 * kept["selective"] and kept["selective"] < 0.9 * kept["none"], kept
    model.config.activation_checkpointing = "sometimes"
    with pytest.raises(ValueError, match="choose one of none, selective, full"):
        model.hidden_states(ids)


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_blocks_match_eager(mode):
    import torch._dynamo

    model = tiny_model()
    ids, doc_ids = batch()
    ref_loss, ref_grads = loss_and_grads(model, ids, doc_ids)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.config.activation_checkpointing = mode
    for layer in model.layers:
        layer.compile()
    loss, got = loss_and_grads(model, ids, doc_ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not silently eager
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for name, g in got.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
