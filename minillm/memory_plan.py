"""What a training run will hold per rank, before it starts: weights, gradients, optimizer state, DeepSpeed's
buffers, activations and the loss chunk, for a model on N ranks at a ZeRO stage.

    python -m minillm.memory_plan --preset llama3.1-8b --ranks 8 --zero-stage 3 --seq-len 4096 \\
        --micro-batch-size 2 --activation-checkpointing selective
    python -m minillm.memory_plan --model runs/pt/model --ranks 2 --zero-stage 3 --device cpu --seq-len 128
    python -m minillm.memory_plan --reference      # the seeds' models on 8, 16 and 64 H100-80GB

The last line is `per-rank peak: X.XX GB` (GB = 2^30 bytes, as the bench reports). The formulas follow what
DeepSpeed 0.19 allocates for minillm's configuration (minillm.engine.deepspeed_config: buckets of dim^2
elements, about two blocks' weights whole at a time under ZeRO-3, a torch AdamW), phase by phase; the peak is
the largest phase. On CPU (fp32, gloo) they are checked against bench/bench_zero_memory.py's measured VmHWM
of every rank at 1, 2 and 4 ranks (BENCHMARKS.md, within 15%); the activation bytes per token against the
tensors autograd saves (tests/test_memory_plan.py). On CUDA (bf16) the same formulas with 2-byte weights and
gradients; the CUDA context and NCCL's buffers are an estimate, not a measurement.

    P  parameters          N  ranks            b  bytes per weight/gradient element (4 fp32 on CPU, 2 bf16)
    G  largest optimizer group (the matrices)   B  DeepSpeed's reduce bucket (dim^2 elements)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minillm.hf import read_config
from minillm.losses import default_chunk_size
from minillm.model import LlamaConfig
from minillm.options import cli, parse_options, require_option

GB = 2**30
# Measured: a rank's resident set once Python, torch, DeepSpeed and the gloo group are up, before any model
# exists (bench/bench_zero_memory.py's traces). On CUDA: the context, cuBLAS workspaces and NCCL buffers; an
# estimate (no GPU measured it here).
RUNTIME_BYTES = {"cpu": 0.75 * GB, "cuda": 1.5 * GB}
# DeepSpeed's ZeRO-0 gradient all-reduce flattens the gradients into buckets of at most this many elements
# (deepspeed/runtime/engine.py, MEMORY_OPT_ALLREDUCE_SIZE; no config key sets it).
ALLREDUCE_BUCKET = 500_000_000

# The seeds' models (LLAMMAS: Llama-2-7B on 8 GPUs; PLLuM: Llama-3.1-8B/70B- and Mistral-Nemo-12B-class).
REFERENCE = {
    "llama3.1-8b": LlamaConfig.from_preset("llama3.1-8b"),
    "mistral-nemo-12b": LlamaConfig.from_preset("mistral-nemo-12b"),
    "llama3.1-70b": LlamaConfig.from_preset("llama3.1-8b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                            hidden_dim=28672),
}


@dataclass(kw_only=True)
class PlanOptions:
    """Per-rank memory of a training run, before it starts."""
    model: str = ""  # a Hugging Face model directory (only config.json is read)
    preset: str = ""  # or a preset name (minillm/model.py PRESETS)
    ranks: int = 8  # data-parallel ranks (GPUs, or processes on CPU)
    zero_stage: Literal[0, 1, 2, 3] = 3  # DeepSpeed ZeRO stage
    device: Literal["cuda", "cpu"] = "cuda"  # cuda: bf16 weights and gradients; cpu: fp32, as minillm trains there
    seq_len: int = 4096  # tokens per row
    micro_batch_size: int = 1  # rows per rank per forward pass
    activation_checkpointing: Literal["none", "selective", "full"] = "none"  # as the training scripts' option
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"  # as the training scripts' option
    gpu_memory_gb: float = 80.0  # the memory of one GPU, to say whether the plan fits
    reference: bool = False  # print the plans for Llama-3.1-8B, Mistral-Nemo-12B and a Llama-3.1-70B-shaped model on 8, 16 and 64 GPUs instead

    def check(self):
        require_option(self.reference or bool(self.model) != bool(self.preset), "model", self.model,
                       "give exactly one of --model DIR and --preset NAME (or --reference)")
        for name in ("ranks", "seq_len", "micro_batch_size"):
            require_option(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")


def parameter_counts(c: LlamaConfig) -> dict:
    """P, the largest optimizer group G (minillm.engine.optimizer_groups: matrices / vectors / embedding + head),
    the largest single tensor, one block's weights, and the vectors (norms, biases)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    block_matrices = c.dim * (2 * q + 2 * kv) + 3 * c.dim * c.hidden_dim
    block_vectors = 2 * c.dim + ((q + 2 * kv) if c.attention_bias else 0)
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    matrices = c.n_layers * block_matrices
    vectors = c.n_layers * block_vectors + c.dim
    return {"P": matrices + vectors + embeddings, "G": max(matrices, embeddings, vectors),
            "largest": max(c.vocab_size * c.dim, c.dim * c.hidden_dim, c.dim * q), "block": block_matrices,
            "vectors": vectors}


def activation_elements(c: LlamaConfig, tokens: int, checkpointing: str) -> tuple[int, int]:
    """What autograd keeps for backward over one micro-batch of `tokens` tokens, in elements: (kept from the
    forward until the backward, recomputed during the backward and alive while one block's backward runs).
    Per block and token without checkpointing: the norms' inputs and outputs and the residual (4 x dim), q and
    the attention output (2 x q), k and v (2 x kv), and SwiGLU's gate, up and product (3 x hidden); plus the
    final norm's input (dim) and rotary's cos and sin (2 x head_dim, shared by every block). full keeps each block's input and reruns one block at a
    time; selective keeps the matmuls' and attention's outputs (an estimate: its saved tensors live inside
    torch.utils.checkpoint, out of reach of tests/test_memory_plan.py's hooks, which check the other two)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    block = 4 * c.dim + 2 * q + 2 * kv + 3 * c.hidden_dim
    kept, recomputed = {"none": (c.n_layers * block, 0),
                        "full": (c.n_layers * c.dim, block),
                        "selective": (c.n_layers * (2 * c.dim + 2 * q + 2 * kv + 2 * c.hidden_dim),
                                      2 * c.dim + c.hidden_dim)}[checkpointing]
    return tokens * (kept + c.dim + 2 * c.head_dim), tokens * recomputed


def loss_chunk_bytes(c: LlamaConfig, tokens: int) -> float:
    """The chunked fused loss (minillm/losses.py): one chunk of fp32 logits in forward, the recomputed chunk and
    its gradient in backward."""
    return 2 * min(default_chunk_size(c.vocab_size), tokens) * c.vocab_size * 4


def plan(c: LlamaConfig, ranks: int, zero_stage: int, device: str = "cuda", seq_len: int = 4096,
         micro_batch_size: int = 1, activation_checkpointing: str = "none", offload: str = "none") -> dict:
    """Bytes per rank, by component, in the phase with the largest total (init, forward+backward, optimizer
    step); "peak" is their sum, "phase" names the phase. With --offload the optimizer's part (and with
    +params ZeRO-3's weight partitions) is in the host's memory: "host" is that, per rank, and "peak" what
    stays on the device."""
    n = parameter_counts(c)
    P, G, N = n["P"], n["G"], ranks
    b = 2 if device == "cuda" else 4
    bf16 = b == 2
    bucket = c.dim * c.dim
    tokens = seq_len * micro_batch_size
    act = b * sum(activation_elements(c, tokens, activation_checkpointing)) + loss_chunk_bytes(c, tokens)
    adam = 8 * P / (N if zero_stage else 1)
    host = 0.0
    if zero_stage == 0:
        # bf16: DeepSpeed's FP16_UnfusedOptimizer (a torch AdamW) keeps fp32 copies of the weights and converts
        # every gradient to fp32 at the step; fp32: AdamW works on the weights themselves.
        weights, master = b * P, (4 * P if bf16 else 0)
        grads = b * P + b * min(P, ALLREDUCE_BUCKET)  # the gradients + the flat all-reduce copy in backward
        phases = {"forward+backward": {"weights": weights, "gradients": grads, "optimizer": adam + master,
                                       "activations": act},
                  "step": {"weights": weights, "gradients": b * P + (4 * P if bf16 else 0),
                           "optimizer": adam + master}}
    elif zero_stage in (1, 2):
        weights, master = b * P, 4 * P / N  # flat weights; the fp32 master partition (a copy even in fp32)
        # ZeRO-1 holds every gradient until the reduce; ZeRO-2 reduces each into a bucket and keeps its part.
        grads = b * P + b * P / N if zero_stage == 1 else b * P / N + 2 * b * bucket + b * n["largest"]
        step_grads = b * P / N + 4 * G / N  # + the step's fp32 flattening of the largest group
        if offload != "none":  # master, fp32 gradients and Adam's moments on the host
            host, master, adam, step_grads = 4 * P / N + 4 * P / N + adam, 0, 0, b * P / N
        phases = {"init": {"weights": weights + b * G, "optimizer": master},  # flattening beside the originals
                  "forward+backward": {"weights": weights, "gradients": grads, "optimizer": adam + master,
                                       "activations": act},
                  "step": {"weights": weights, "gradients": step_grads, "optimizer": adam + master}}
    else:
        # Each rank: its partition of the weights, their fp32 master (a separate copy, even in fp32), the
        # gradient partition, Adam's moments; whole: about two blocks' weights (stage3_max_live_parameters),
        # the vectors (persistence threshold), the reduce bucket and the gradient of the tensor being reduced.
        live = min(P, max(2 * n["block"], c.vocab_size * c.dim))
        weights = b * P / N + b * n["vectors"]
        master = 4 * P / N
        grads = b * P / N + b * bucket + b * n["largest"]
        step_grads = b * P / N + 4 * P / N  # + the step's fp32 flattening of the gradients
        if offload != "none":
            host, master, adam, step_grads = master + 4 * P / N + adam, 0, 0, b * P / N
        if offload == "optimizer+params":
            host, weights = host + b * P / N, b * n["vectors"]
        phases = {"forward+backward": {"weights": weights + b * live, "gradients": grads,
                                       "optimizer": adam + master, "activations": act},
                  "step": {"weights": weights, "gradients": step_grads, "optimizer": adam + master}}
    runtime = RUNTIME_BYTES[device]
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    parts = {"runtime": runtime, **phases[phase]}
    if device == "cpu":  # offloading to the same memory moves nothing
        parts["optimizer"] += host
        host = 0.0
    return {"phase": phase, "parts": parts, "peak": sum(parts.values()), "host": host, "params": P}


def describe(c: LlamaConfig, cfg: PlanOptions) -> str:
    p = plan(c, cfg.ranks, cfg.zero_stage, cfg.device, cfg.seq_len, cfg.micro_batch_size, cfg.activation_checkpointing,
             cfg.offload)
    dtype = "bf16" if cfg.device == "cuda" else "fp32"
    lines = [f"{p['params'] / 1e9:.2f}B parameters, {cfg.ranks} rank(s), ZeRO-{cfg.zero_stage}, {cfg.device} ({dtype}), "
             f"{cfg.micro_batch_size} x {cfg.seq_len} tokens per micro-batch, activation checkpointing "
             f"{cfg.activation_checkpointing}, offload {cfg.offload}; the largest phase: {p['phase']}"]
    lines += [f"  {name:<12} {value / GB:8.2f} GB" for name, value in p["parts"].items()]
    if p["host"]:
        lines.append(f"  (+ {p['host'] / GB:.2f} GB of this rank's offloaded state in the host's memory)")
    if cfg.device == "cuda":
        fits = "fits" if p["peak"] <= cfg.gpu_memory_gb * GB else "does NOT fit"
        lines.append(f"  ({fits} in {cfg.gpu_memory_gb:g} GB per GPU)")
    lines.append(f"per-rank peak: {p['peak'] / GB:.2f} GB")
    return "\n".join(lines)


def reference_table(gpu_gb: float = 80.0, seq_len: int = 4096) -> str:
    """Markdown: the seeds' models on 8, 16 and 64 GPUs, bf16, ZeRO-3, one row of seq_len tokens per micro-batch:
    per-rank GPU peak by activation checkpointing, and with the optimizer offloaded (full checkpointing)."""
    rows = ["| model | params | GPUs | no checkpointing | selective | full | full + offload optimizer "
            "(host per GPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in REFERENCE.items():
        for ranks in (8, 16, 64):
            cells = []
            for mode, offload in (("none", "none"), ("selective", "none"), ("full", "none"),
                                  ("full", "optimizer")):
                p = plan(c, ranks, 3, "cuda", seq_len, 1, mode, offload)
                cell = f"{p['peak'] / GB:.1f}" + ("" if p["peak"] <= gpu_gb * GB else " (no)")
                cells.append(cell + (f" ({p['host'] / GB:.1f})" if p["host"] else ""))
            rows.append(f"| {name} | {parameter_counts(c)['P'] / 1e9:.1f}B | {ranks} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


@cli
def main(argv=None):
    cfg = parse_options(PlanOptions, argv, prog="python -m minillm.memory_plan", description=__doc__)
    if cfg.reference:
        print(f"ZeRO-3, bf16, 1 x {cfg.seq_len} tokens per micro-batch; per-rank peak in GB "
              f"((no): above {cfg.gpu_memory_gb:g} GB)")
        print(reference_table(cfg.gpu_memory_gb, cfg.seq_len), end="")
        return
    config = read_config(cfg.model)[0] if cfg.model else LlamaConfig.from_preset(cfg.preset)
    print(describe(config, cfg))


if __name__ == "__main__":
    main()
