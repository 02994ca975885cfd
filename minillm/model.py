"""The Llama architecture, hand-written: config -> RMSNorm -> rotary -> attention -> MLP -> block -> model.

Read it top to bottom in the order the data flows. Parameter names follow llama2.c / Meta's
original release (tok_embeddings, attention.wq, feed_forward.w1, ...); `minillm/hf.py` maps them
to and from the Hugging Face names and loads/saves that layout. Rotary embeddings use the Hugging Face "rotate half" layout
(the first half of each head's dims pairs with the second half), so HF checkpoints load as-is:
HF permuted Meta's interleaved q/k weights once at conversion time so that this layout works, and
adopting it means loading never has to permute (and never copies a tensor just to reorder it).
Mistral (incl. Nemo's head_dim != dim / n_heads) and Qwen2 (q/k/v biases) are this same architecture:
config.family only says which Hugging Face model_type the weights came from and go back to.
"""
from __future__ import annotations

import contextlib
import math
import platform
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from minillm.attention import attention, decode_attention
from minillm.losses import cross_entropy_sum, token_logprobs


# The Hugging Face model types this architecture covers. They differ only in what config.json calls
# things and in Qwen2's q/k/v biases; minillm/hf.py writes each back as the family it was.
FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096  # model width (HF: hidden_size)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # < n_heads means grouped-query attention; None = n_heads
    head_dim: int | None = None  # width of one head; None = dim // n_heads (Mistral-Nemo: 128 with dim 5120, 32 heads)
    hidden_dim: int = 11008  # SwiGLU inner width (HF: intermediate_size)
    attention_bias: bool = False  # biases on the q/k/v projections, never on the output one (Qwen2 has them)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF format, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # output matrix shares the embedding table (Llama-3.2 1B/3B do)
    family: str = "llama"  # the Hugging Face model_type it is saved as: llama | mistral | qwen2
    bos_id: int = 1
    eos_id: int = 2
    eos_ids: list[int] | None = None  # all of them when config.json lists several (Llama-3 Instruct); eos_id = the first
    pad_id: int | None = None
    # How to run it, not what it is (never written to config.json): the attention backend (auto | triton |
    # sdpa | math, see minillm/attention.py) and activation checkpointing (none | selective | full, below).
    attn_backend: str = "auto"
    activation_checkpointing: str = "none"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; give head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} and "
                             f"head_dim {self.head_dim} even (rotary pairs its dims)")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.attention_bias != (self.family == "qwen2"):  # what each family's Hugging Face code builds
            raise ValueError(f"attention_bias={self.attention_bias} does not fit family {self.family!r}: "
                             "Qwen2 always has q/k/v biases, Llama and Mistral never")
        if self.eos_ids is not None:
            if not self.eos_ids:
                raise ValueError("eos_ids is empty; use None for the single eos_id")
            self.eos_ids = [int(i) for i in self.eos_ids]
            self.eos_id = self.eos_ids[0]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def architecture(self) -> dict:
        """The fields that define the weights (everything but the runtime choices)."""
        return {k: v for k, v in asdict(self).items() if k not in ("attn_backend", "activation_checkpointing")}


# The published configurations (their config.json on the Hugging Face Hub); tests/test_presets.py checks
# each parameter count against the published size and against transformers building the same config.
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0, bos_id=128000, eos_id=128001)
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}
PRESETS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           max_seq_len=2048),
    "llama3-8b": dict(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, max_seq_len=8192),
    "llama3.1-8b": dict(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, rope_scaling=_LLAMA31_ROPE,
                        max_seq_len=131072),
    "llama3.2-1b": dict(**_LLAMA3, dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, rope_scaling=_LLAMA32_ROPE,
                        max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": dict(**_LLAMA3, dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, rope_scaling=_LLAMA32_ROPE,
                        max_seq_len=131072, tie_embeddings=True),
    "mistral-nemo-12b": dict(family="mistral", vocab_size=131072, dim=5120, n_layers=40, n_heads=32, n_kv_heads=8,
                             head_dim=128, hidden_dim=14336, rope_theta=1000000.0, max_seq_len=1024000),
    "qwen2.5-7b": dict(family="qwen2", attention_bias=True, vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, hidden_dim=18944, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072,
                       bos_id=151643, eos_id=151643),
    # Tiny sizes for tests, the CPU demo and benchmarks.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=256),
    "demo": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=512),
    "small": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1376, max_seq_len=2048),
    "1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, hidden_dim=5632, max_seq_len=4096),
}


class _RMSNormFunction(torch.autograd.Function):
    """y = w * n, n = x * r, r = 1 / sqrt(mean(x^2) + eps), with a hand-written backward
        dw = sum_tokens g * n,    dx = r * (dn - n * mean(dn * n)),  dn = g * w
    that saves only x (the residual stream, alive anyway) and r: autograd's own graph would also
    keep n, one more [tokens, dim] tensor per norm (two per block)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (float64 stays float64)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        n = x.to(r.dtype) * r
        dn = g.to(r.dtype) * weight.to(r.dtype)
        dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:  # the forward rounded n to x's dtype before scaling it
            dw = (g.to(r.dtype) * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 because bf16 loses the small variance terms."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d), with Llama-3's "llama3" long-context rescaling if configured.

    Llama 3.1 stretches low frequencies (long wavelengths) by `factor`, keeps high ones, and
    interpolates smoothly between, so a model trained on 8K positions extrapolates to 128K.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq.float()
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves: stretch
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)  # in between: interpolate
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.float()


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, 1, T, head_dim] for explicit positions (packed documents restart at 0)."""
    freqs = position_ids[..., None].float() * inv_freq  # fp32: bf16 positions lose precision past 256
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys/values (and document ids) of every layer for incremental decoding, preallocated.

    One tensor per layer, not one [n_layers, ...] tensor: a compiled decode step writes each layer's new column
    in place (index_copy_) into its own input tensor, where a write into a view of one shared tensor is
    functionalised into a copy of the whole cache layer, twice, every step (measured: 4x the step's cache time)."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.doc = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0  # positions filled so far; the model advances it after each forward

    @property
    def width(self) -> int:
        """Positions the cache holds (filled or not)."""
        return self.doc.shape[1]


# Inference products on CPU go through oneDNN's matmul (part of torch; what inductor's CPU backend calls)
# instead of aten's default, MKL's sgemm: on this project's AMD EPYC machines oneDNN reads the weights up to
# 2.2x faster for a decoding batch's few rows (the head the most) and 1.05-1.35x faster for a prefill's
# (bench/bench_linear.py, BENCHMARKS.md), from the plain [out, in] weight, so with no copy. It has no backward:
# whatever autograd records (training) stays on F.linear. The two sum in another order, so their results
# differ in the last bits, as any two BLAS libraries' do. x86 only: that is where it was measured (on ARM
# torch's oneDNN goes through other kernels, and MKL is not what F.linear uses there).
ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.library.custom_op("minillm::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's x @ weight.T + bias, opaque to torch.compile: inductor lowers the mkldnn op itself only for
    frozen (constant) weights, and this way a compiled step runs the very kernel eager does, bit for bit."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU forward, when autograd records nothing, is oneDNN's matmul (see above)."""

    def forward(self, x):
        if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            if torch.compiler.is_compiling():
                return onednn_linear(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # no Python hop
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attention_bias  # heads are head_dim wide, so n_heads * head_dim need not equal dim
        self.wq = Linear(config.dim, config.n_heads * self.head_dim, bias=bias)
        self.wk = Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.wv = Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.wo = Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, doc_ids, cache: KVCache | None, column=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if column is not None:  # a decoding step (Llama.decode_step): doc_ids is the [B, S] visibility mask
            # Written in place at a tensor index and read over the cache's whole width: every step has the
            # same shapes (what torch.compile and CUDA graphs need); unwritten columns are masked out.
            self.cache_write(cache, column, k, v)
            out = decode_attention(q, cache.k[self.layer_idx], cache.v[self.layer_idx], doc_ids,
                                   backend=self.config.attn_backend)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        k_doc = doc_ids
        if cache is not None:  # append this step's keys, then attend over everything cached
            start, end = cache.length, cache.length + T
            cache.k[self.layer_idx][:, :, start:end] = k
            cache.v[self.layer_idx][:, :, start:end] = v
            k, v = cache.k[self.layer_idx][:, :, :end], cache.v[self.layer_idx][:, :, :end]
            k_doc = cache.doc[:, :end]
        # The K/V heads stay un-repeated: the attention backends handle GQA without copying them.
        out = attention(q, k, v, q_doc=doc_ids, k_doc=k_doc, backend=self.config.attn_backend, announce=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def cache_write(self, cache: KVCache, column, k, v):
        cache.k[self.layer_idx].index_copy_(2, column, k)
        cache.v[self.layer_idx].index_copy_(2, column, v)


class _SiluMulFunction(torch.autograd.Function):
    """silu(a) * b with a hand-written backward, s = sigmoid(a):
        da = g * b * s * (1 + a * (1 - s)),   db = g * a * s
    It saves a and b only and recomputes s: autograd would also keep silu(a), one more
    [tokens, hidden_dim] tensor per block -- the widest activation of the model."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(a)
        return g * b * s * (1 + a * (1 - s)), g * a * s


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is HF's gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(_SiluMulFunction.apply(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, doc_ids, cache=None, column=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, cache, column)
        return h + self.feed_forward(self.ffn_norm(h))


class OutputHead(Linear):
    """The output projection (dim -> vocab_size): logits, or with labels the loss straight from the hidden
    states through the chunked fused head of minillm/losses.py, so the [B, T, vocab] logits never exist at
    once. Being a module call either way matters under ZeRO-3: DeepSpeed gathers the weight for this call
    (and again for its backward) and releases it after, instead of keeping a vocab x dim matrix whole on
    every rank for the whole step, as a weight read from outside its module would have to be."""

    def forward(self, hidden, labels=None, reduction: str = "sum"):
        if labels is None:
            return super().forward(hidden)
        if reduction == "sum":
            return cross_entropy_sum(hidden, self.weight, labels)[0]
        if reduction == "none":
            return -token_logprobs(hidden, self.weight, labels)
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")


# Activation checkpointing (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models"). "full" keeps only each block's input and reruns the whole block in backward.
# "selective" keeps what the matmuls and the attention kernels produced, the expensive part, and reruns
# only the rest: norms, rotary, SwiGLU's activation, layout copies -- cheap elementwise work that holds
# a good part of the memory. Ops are matched by name; minillm::flash_attention is the Triton kernel.
CHECKPOINTING = ("none", "selective", "full")
_SAVED_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_cudnn_attention", "minillm::flash_attention"}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op.name() in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def no_gathering(params):
    """The `gathered` of a model whose parameters are whole (not ZeRO-3 partitions): nothing to do."""
    return contextlib.nullcontext()


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = OutputHead(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Rotary frequencies stay a plain fp32 tensor, not a buffer: model.to(bfloat16) would round a
        # buffer, putting the angle at position 4000 off by most of a radian. Moved per forward (tiny).
        self.inv_freq = rope_inv_freq(config)
        if init:  # (ZeRO-3 builds the model partitioned, then calls init_weights with its gathering)
            self.init_weights()

    def init_weights(self, gathered=None):
        """Every matrix N(0, 0.02), biases 0 (norms start at 1), then the residual projections (wo, w2) scaled
        down as GPT-2 / llama2.c do, so the residual stream's variance does not grow with depth at init.

        One module at a time, in a fixed order, from the global generator: the same seed gives the same
        weights however the model is stored. Under ZeRO-3 (minillm.engine) `gathered(params)` makes a
        module's partitioned parameters whole while they are drawn."""
        gathered = gathered or no_gathering
        for module in self.modules():  # only leaves draw, so this is the order nn.Module.apply visits them in
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with gathered(list(module.parameters(recurse=False))), torch.no_grad():
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                with gathered([p]), torch.no_grad():
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        weight = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len, dtype or weight.dtype, device or weight.device)

    def hidden_states(self, input_ids, position_ids=None, doc_ids=None, cache: KVCache | None = None):
        """Final normalised hidden states [B, T, dim]; logits are `self.output` of these.

        position_ids [B, T]: default 0..T-1 (continuing after the cache). doc_ids [B, T]: a token
        attends only to earlier tokens with the same id, so packed documents never see each other.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if T > self.config.max_seq_len and cache is None:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if cache is not None:
            if start + T > cache.width:
                raise ValueError(f"KV cache holds {cache.width} positions; {start + T} needed")
            if doc_ids is None:
                doc_ids = cache.doc[:, start:start + T]  # zeros: one document
            else:
                cache.doc[:, start:start + T] = doc_ids
        h = self.tok_embeddings(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq.to(h.device), h.dtype)  # shared by every layer
        mode = self.config.activation_checkpointing if self.training and cache is None else "none"
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing {mode!r}: choose one of {', '.join(CHECKPOINTING)}")
        for layer in self.layers:
            if mode == "none":
                h = layer(h, cos, sin, doc_ids, cache)
            else:
                context = _selective_context if mode == "selective" else noop_context_fn
                h = checkpoint(layer, h, cos, sin, doc_ids, use_reentrant=False, context_fn=context)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def decode_step(self, input_ids, position_ids, cache: KVCache, column):
        """One decoding step: input_ids/position_ids [B, 1] (one new token per row) -> next-token logits [B, V].

        The static-cache counterpart of `hidden_states(..., cache=cache)` + the head, with every shape fixed
        by the cache: the new keys/values go into cache column `column` (a 1-element long tensor, not an int,
        so the step is one function for every column) and attention reads all cache.width columns,
        masked to those holding a row's own tokens (document id != 0; rows are right-aligned, so every such
        column is earlier than this one). Fixed shapes let `torch.compile` trace it once (and CUDA graphs
        replay it); the caller advances cache.length. The new token gets document id 1, as in generation."""
        cache.doc.index_fill_(1, column, 1)
        visible = cache.doc.ne(0)
        h = self.tok_embeddings(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq.to(h.device), h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, visible, cache, column)
        return self.output(self.norm(h)[:, -1])

    def forward(self, input_ids, labels=None, position_ids=None, doc_ids=None, cache: KVCache | None = None,
                reduction: str = "sum"):
        """Logits [B, T, vocab_size] without labels. With labels ([B, T], already shifted, -100 = not
        scored) the loss instead, through the chunked fused head of minillm/losses.py, so the [B, T, vocab]
        logits never exist at once: reduction "sum" gives the summed NLL over the scored tokens (a scalar,
        what pretraining and SFT divide by the global token count), "none" the NLL per token [B, T] (0 where
        not scored; ORPO averages its negation per response)."""
        return self.output(self.hidden_states(input_ids, position_ids, doc_ids, cache), labels, reduction)
