"""Generation: KV-cache decoding, left-padded batches, seeded sampling and the logits processors.

Run: python -m pytest -q tests/test_generate.py

Oracles: the model's own full (cache-free) forward pass, one-prompt-at-a-time generation,
hand-computed distributions, and transformers' logits processors for the sampling semantics.
"""
import math

import pytest
import torch
import transformers
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.generate import DecodeBatch, Sampling, Sequence, generate, left_pad, process_logits
from minillm.model import ONEDNN_LINEAR, Linear, Llama, LlamaConfig

V = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                         max_seq_len=128, rope_theta=50000.0, eos_id=2, pad_id=0)
    m = Llama(config).eval()
    with torch.no_grad():  # larger weights than the training init: peaked, decisive next-token logits
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return m


def random_ids(n, seed):
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_decoding_matches_full_forward(model, chunk):
    ids = torch.tensor([random_ids(24, seed=1), random_ids(24, seed=2)])
    full = model(ids)
    cache = model.new_cache(2, 24)
    steps = [(0, 6)] + [(s, min(s + chunk, 24)) for s in range(6, 24, chunk)]  # prefill, then decode
    for start, end in steps:
        logits = model(ids[:, start:end], cache=cache)
        assert (logits - full[:, start:end]).abs().max().item() < 1e-5, (start, end)
    assert cache.length == 24


@torch.no_grad()
def test_left_padded_rows_match_unpadded_forward(model):
    short, long = random_ids(5, seed=3), random_ids(11, seed=4)
    ids, pos, doc = left_pad([short, long], pad_id=0, device="cpu")
    assert ids[0, :6].tolist() == [0] * 6 and pos[0].tolist() == [0] * 6 + list(range(5))
    assert doc[0].tolist() == [0] * 6 + [1] * 5 and doc[1].tolist() == [1] * 11
    cache = model.new_cache(2, 16)
    padded = model(ids, position_ids=pos, doc_ids=doc, cache=cache)
    alone = model(torch.tensor([short]))
    assert (padded[0, 6:] - alone[0]).abs().max().item() < 1e-5
    # One decoding step through the cache, continuing each row's own positions.
    nxt = torch.tensor([[7], [8]])
    step = model(nxt, position_ids=pos[:, -1:] + 1, doc_ids=torch.ones_like(nxt), cache=cache)
    alone_step = model(torch.tensor([short + [7]]))[:, -1]
    assert (step[0] - alone_step).abs().max().item() < 1e-5


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The oracle: one full, cache-free forward pass over the whole sequence per new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def test_static_decode_step_matches_full_forward_at_every_column(model):
    """decode_step reads the cache's whole width (fixed shapes): the columns not yet written and a shorter
    row's left padding must be masked out exactly, step after step."""
    short, long = random_ids(4, seed=11), random_ids(9, seed=12)
    ids, pos, doc = left_pad([short, long], pad_id=0, device="cpu")
    cache = model.new_cache(2, 9 + 6)
    model.hidden_states(ids, position_ids=pos, doc_ids=doc, cache=cache)
    rows, next_pos = [short, long], pos[:, -1] + 1
    for step in range(6):
        new = torch.tensor([[20 + step], [40 + step]])
        width = cache.width
        logits = model.decode_step(new, next_pos[:, None], cache, torch.tensor([cache.length]))
        assert cache.width == width and [k.shape[2] for k in cache.k] == [width] * len(cache.k)
        assert logits.shape == (2, V)
        cache.length += 1
        next_pos = next_pos + 1
        rows = [r + [int(t)] for r, t in zip(rows, new[:, 0])]
        for b, row in enumerate(rows):
            assert (logits[b] - model(torch.tensor([row]))[0, -1]).abs().max().item() < 1e-5, (step, b)


def test_greedy_generation_equals_cache_free_decoding(model):
    prompts = [random_ids(n, seed=50 + n) for n in (2, 11, 6)]
    got = generate(model, prompts, max_new_tokens=10, eos_id=[])
    assert got == [greedy_without_cache(model, p, 10) for p in prompts]


@pytest.mark.slow
def test_compiled_decode_step_generates_what_eager_does(model):
    """torch.compile of the decode step (inductor on CPU; about a minute to compile on a loaded 2-core VM, hence
    slow and one batch shape only: equal budgets, so no row leaves early and nothing recompiles)."""
    prompts = [random_ids(n, seed=60 + n) for n in (3, 8)]
    eager = generate(model, prompts, max_new_tokens=8, eos_id=[])
    assert generate(model, prompts, max_new_tokens=8, eos_id=[], compile=True) == eager
    assert eager == [greedy_without_cache(model, p, 8) for p in prompts]
    sampled = dict(max_new_tokens=8, eos_id=[], temperature=1.3, top_p=0.95, seed=5)
    assert generate(model, prompts, compile=True, **sampled) == generate(model, prompts, **sampled)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the compiled decode step's CUDA graphs are NOT covered (bench/gpu_check.sh)")
def test_compiled_decode_step_replays_cuda_graphs(model):
    """On a GPU: "reduce-overhead" really records CUDA graphs (none skipped: the cache the step writes into is
    marked static) and the compiled step, rows leaving included, generates what eager does."""
    gpu = Llama(model.config).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    prompts = [random_ids(n, seed=70 + n) for n in (3, 8, 5)]
    counters.clear()
    for budget in (6, 9):  # the second call: a new cache (new addresses) and rows that leave at an end id
        eager = generate(gpu, prompts, max_new_tokens=budget, eos_id=[7])
        assert generate(gpu, prompts, max_new_tokens=budget, eos_id=[7], compile=True) == eager
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


class OpsCalled(TorchDispatchMode):
    """The aten/mkldnn ops a block of code ran, by name."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="not x86, or this torch build has no oneDNN: Linear is F.linear there")
def test_inference_linear_is_onednn_and_training_linear_is_f_linear():
    """Linear (every projection of the model, the head included) runs oneDNN's matmul when autograd records
    nothing on CPU in fp32 -- rows 1 to 65, a bias, a non-contiguous input, a [B, 1, dim] decoding input --
    and the products equal a float64 re-derivation to fp32 rounding; with autograd (training) or in bf16 it is
    F.linear, bit for bit, gradients included."""
    torch.manual_seed(0)
    layer = Linear(512, 700, bias=True)
    for shape in [(1, 512), (2, 512), (8, 1, 512), (33, 512), (65, 512), (8, 1024)]:
        x = torch.randn(shape)[..., :512]  # (8, 1024) -> a non-contiguous [8, 512] view
        exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        with torch.inference_mode(), OpsCalled() as ops:
            fast = layer(x)
        assert "mkldnn._linear_pointwise" in ops.names, (shape, ops.names)
        assert fast.shape == exact.shape and fast.dtype == torch.float32
        torch.testing.assert_close(fast.double(), exact, rtol=0, atol=2e-5)  # |y| ~ 13: a few fp32 ulps
    x = torch.randn(8, 512, requires_grad=True)
    with OpsCalled() as ops:
        y = layer(x)
    assert "mkldnn._linear_pointwise" not in ops.names
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    graphs = []  # compiled: the graph torch.compile hands its backend calls the same kernel, as one opaque op

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.randn(8, 512)
    with torch.inference_mode():
        compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)(x)
        assert torch.equal(compiled, layer(x))
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls == ["minillm.onednn_linear.default"]
    half = Linear(64, 32).to(torch.bfloat16)
    h = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(h), torch.nn.functional.linear(h, half.weight, half.bias))


def test_batched_left_padded_generation_equals_one_by_one(model):
    prompts = [random_ids(n, seed=n) for n in (3, 9, 1, 6)]
    for kwargs in (dict(), dict(repetition_penalty=1.3)):
        batched = generate(model, prompts, max_new_tokens=12, eos_id=[], **kwargs)
        single = [generate(model, [p], max_new_tokens=12, eos_id=[], **kwargs)[0] for p in prompts]
        assert batched == single
        assert all(len(t) == 12 for t in batched)
    greedy = generate(model, prompts, max_new_tokens=12, eos_id=[])
    penalised = generate(model, prompts, max_new_tokens=12, eos_id=[], repetition_penalty=1.3)
    assert greedy != penalised  # the penalty was actually applied


def test_same_seed_same_samples_different_seed_different(model):
    prompts = [random_ids(4, seed=5), random_ids(7, seed=6)]
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, eos_id=[])
    a = generate(model, prompts, seed=123, **kwargs)
    torch.manual_seed(999)  # the global RNG must not matter
    b = generate(model, prompts, seed=123, **kwargs)
    c = generate(model, prompts, seed=124, **kwargs)
    assert a == b
    assert a != c


def test_top_k_1_sampling_is_greedy(model):
    prompts = [random_ids(5, seed=7), random_ids(2, seed=8)]
    greedy = generate(model, prompts, max_new_tokens=10, eos_id=[])
    assert generate(model, prompts, max_new_tokens=10, eos_id=[], temperature=2.0, top_k=1, seed=0) == greedy


def test_eos_stops_and_is_not_returned(model):
    prompt = random_ids(6, seed=9)
    free = generate(model, [prompt], max_new_tokens=15, eos_id=[])[0]
    stop = free[7]
    assert generate(model, [prompt], max_new_tokens=15, eos_id=stop)[0] == free[:free.index(stop)]
    streamed = []
    out = generate(model, [prompt, prompt[:3]], max_new_tokens=15, eos_id=[stop],
                   stream=lambda row, tok: streamed.append((row, tok)))
    assert [t for r, t in streamed if r == 0] == out[0] and [t for r, t in streamed if r == 1] == out[1]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.2, top_p=0.95, repetition_penalty=1.3, seed=7)])
def test_sequences_joining_and_leaving_mid_decode_get_what_they_get_alone(model, sampling):
    """Continuous batching: rows join at different steps (a longer prompt than the running rows' width, a
    shorter one), leave at different steps, and each gets exactly the tokens generate gives it alone."""
    prompts = [random_ids(n, seed=30 + n) for n in (4, 13, 2, 7)]
    budgets = [12, 5, 9, 6]
    join_at = {0: [0], 2: [1], 4: [2, 3]}  # step -> the sequences that join before it
    alone = [generate(model, [p], max_new_tokens=n, eos_id=[], temperature=sampling.temperature,
                      top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty, seed=sampling.seed)[0]
             for p, n in zip(prompts, budgets)]
    seqs = [Sequence(p, n, sampling) for p, n in zip(prompts, budgets)]
    batch, widths, step = DecodeBatch(model), [], 0
    while step <= max(join_at) or batch.seqs:
        batch.add([seqs[i] for i in join_at.get(step, [])])
        widths.append(len(batch.seqs))
        batch.step()
        step += 1
    assert [s.tokens for s in seqs] == alone
    assert all(s.finish_reason == "length" for s in seqs)
    assert max(widths) == 4 and batch.cache is None  # rows really overlapped, and all left


def test_a_sequence_finished_from_outside_leaves_at_the_next_step(model):
    batch = DecodeBatch(model)
    keep, cancel = Sequence(random_ids(5, seed=40), 8), Sequence(random_ids(9, seed=41), 8)
    batch.add([keep, cancel])
    batch.step()
    cancel.finish("cancelled")
    events = batch.step()
    assert (cancel, None) in events and batch.seqs == [keep] and len(cancel.tokens) == 1
    assert [k.shape[0] for k in batch.cache.k] == [1] * len(batch.cache.k)
    while batch.seqs:
        batch.step()
    assert keep.tokens == generate(model, [keep.prompt], max_new_tokens=8, eos_id=[])[0]


class CharTokenizer:
    """Each id decodes to one letter: enough to place a stop string exactly."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_string_trims_from_its_first_token(model):
    prompt = random_ids(6, seed=10)
    free = generate(model, [prompt], max_new_tokens=15, eos_id=[])[0]
    text = CharTokenizer().decode(free)
    stop = text[8:10]
    expected = free[:text.find(stop)]
    out = generate(model, [prompt], max_new_tokens=15, eos_id=[], stop_strings=["zzzzzz", stop],
                   tokenizer=CharTokenizer())
    assert out == [expected]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [prompt], stop_strings=["x"])


# ----------------------------------------------------------------------------- logits processing

def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0]])
    seen = torch.tensor([[True, True, False, True, False]])
    out = process_logits(logits, seen, temperature=1.0, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0, -3.0]]  # positive / 2, negative * 2, unseen untouched


def test_top_p_and_top_k_hand_computed():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(process_logits(logits, top_p=0.4)) == [False, True, False, False]   # 0.5 >= 0.4
    assert kept(process_logits(logits, top_p=0.75)) == [False, True, False, True]   # 0.5 + 0.3 >= 0.75
    assert kept(process_logits(logits, top_p=0.85)) == [False, True, True, True]    # needs 0.15 too
    assert kept(process_logits(logits, top_k=2)) == [False, True, False, True]
    # Survivors renormalise to their share: top_p 0.75 -> 0.5/0.8 and 0.3/0.8.
    renorm = process_logits(logits, top_p=0.75).softmax(-1)[0]
    assert renorm.tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375], abs=1e-6)
    # Temperature divides the logits: T = 0.5 squares the (normalised) probabilities.
    sharpened = process_logits(logits, temperature=0.5).softmax(-1)[0]
    squares = [p * p / sum(q * q for q in probs[0].tolist()) for p in probs[0].tolist()]
    assert sharpened.tolist() == pytest.approx(squares, abs=1e-6)


def test_processors_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 12), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, history, True)
    for temperature, top_k, top_p, penalty in [(1.0, 0, 0.9, 1.2), (0.6, 0, 0.9, 1.2), (1.3, 10, 1.0, 1.0),
                                               (0.7, 5, 0.5, 1.5)]:
        expected = transformers.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        warpers = [transformers.TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(transformers.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        for w in warpers:
            expected = w(history, expected)
        got = process_logits(logits, seen, temperature, top_k, top_p, penalty)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(got)
        assert torch.allclose(got[finite], expected[finite], atol=1e-6)
        assert not math.isinf(got.max().item())
