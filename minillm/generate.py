"""Text generation with a KV cache: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded to a common length, so every row's next token sits in the last column.
Padding must not change the result, so (a) each row's positions restart at 0 on its first real
token and (b) pads get document id 0 and real tokens document id 1: attention never crosses
document ids, so real tokens never see the pads (and vice versa). A batched call therefore
gives the same tokens as generating each prompt alone; with a seed, sampled ones too, since every row
draws from its own generator.

One implementation decodes for everyone: `DecodeBatch` steps a set of `Sequence`s through one KV cache,
and sequences may join between steps and leave when they finish (continuous batching, what
minillm.serve runs); `generate` is one batch that nobody joins.

Sampling follows Hugging Face semantics and order: repetition penalty, temperature, top-k, top-p
(see `process_logits`). The LLAMMAS paper samples with temperature 0.6, top_p 0.9,
repetition_penalty 1.2.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch._dynamo

from minillm.options import require_option


def process_logits(logits, seen=None, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """Next-token logits [B, V] -> adjusted logits, with removed tokens set to -inf. Pure function.

    repetition_penalty (CTRL, Keskar et al. 2019, as in transformers): for every token in `seen`
      [B, V] bool (prompt + generated so far), positive logits are divided by the penalty and
      negative ones multiplied, so a penalty > 1 always makes a seen token less likely.
    temperature: logits / temperature (not applied when 0, which means greedy).
    top_k: keep the k largest logits (0 = all).
    top_p (nucleus, Holtzman et al. 2020): keep the smallest set of most likely tokens whose
      probability reaches top_p; the most likely token always survives.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the nucleus is already complete without this token
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits, temperature, generator=None):
    """Greedy argmax when temperature == 0, else one sample from softmax(logits)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts, pad_id, device):
    """Batch of prompts -> input_ids, position_ids, doc_ids [B, T], pads on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    doc = torch.zeros_like(ids)  # 0 = padding, 1 = the prompt
    for b, p in enumerate(prompts):
        n = len(p)
        ids[b, T - n:] = torch.tensor(p, dtype=torch.long)
        pos[b, T - n:] = torch.arange(n)
        doc[b, T - n:] = 1
    return ids.to(device), pos.to(device), doc.to(device)


def stop_string_cut(tokens, stop_strings, tokenizer):
    """If the decoded tokens contain a stop string, the number of tokens to keep: those whose text
    ends before the first stop string starts (the stop string and anything after are trimmed).
    None when no stop string occurs."""
    text = tokenizer.decode(tokens)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    start = min(hits)
    keep = 0
    while keep < len(tokens) and len(tokenizer.decode(tokens[:keep + 1])) <= start:
        keep += 1
    return keep


def check_sampling(options):
    """The sampling options of a command (evaluate.py, minillm.chat) in range: temperature, top_p, top_k,
    repetition_penalty; OptionError naming the flag."""
    require_option(options.temperature >= 0, "temperature", options.temperature, "must be >= 0 (0 = greedy)")
    require_option(0 < options.top_p <= 1, "top_p", options.top_p, "must be in (0, 1]")
    require_option(options.top_k >= 0, "top_k", options.top_k, "must be >= 0 (0 = all)")
    require_option(options.repetition_penalty > 0, "repetition_penalty", options.repetition_penalty, "must be > 0")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How one sequence picks its tokens (see process_logits); temperature 0 = greedy. seed: the sequence
    draws from its own torch.Generator seeded with it, so its samples depend on nothing else in the batch;
    None draws from torch's global generator."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


class Sequence:
    """One prompt being continued: its settings, the tokens accepted so far, and why it ended.

    stop_ids: token ids that end it (not returned). stop_strings: it also ends once its decoded text
    contains one (needs `tokenizer`); the tokens from the one that starts the stop string onwards are
    trimmed. finish_reason: None while it runs, then "stop" (a stop id or string), "length" (max_new_tokens
    reached) or whatever `finish` was told (a server's "cancelled")."""

    def __init__(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), stop_strings=(), tokenizer=None):
        if len(prompt) == 0:
            raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
        if stop_strings and tokenizer is None:
            raise ValueError("generate: stop_strings need a tokenizer to decode the generated text")
        self.prompt, self.max_new_tokens, self.sampling = list(prompt), max_new_tokens, sampling
        self.stop_ids, self.stop_strings, self.tokenizer = frozenset(stop_ids), list(stop_strings), tokenizer
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.generator = None  # made when the sequence joins a batch (on the model's device)
        self.seen = None  # [V] bool: tokens of the prompt and the reply, for the repetition penalty

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str):
        if self.finish_reason is None:
            self.finish_reason = reason

    def accept(self, token: int) -> bool:
        """Take the picked token; False when it is a stop id (then it is not kept)."""
        if token in self.stop_ids:
            self.finish("stop")
            return False
        self.tokens.append(token)
        if self.stop_strings:
            keep = stop_string_cut(self.tokens, self.stop_strings, self.tokenizer)
            if keep is not None:
                del self.tokens[keep:]
                self.finish("stop")
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
        return True


# One compiled decode step per model, kept for the model's lifetime: every generate call and every server
# batch reuses it (dynamo's guards decide when a new shape needs a recompile).
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode_step(model):
    """torch.compile of model.decode_step: inductor on CPU; on CUDA "reduce-overhead", which replays the step
    as a CUDA graph (one launch instead of one per kernel, what makes small-batch decoding fast on a GPU).
    Shapes: the first batch compiles for its exact shapes; when a later one differs (another cache width or
    number of rows: every evaluation batch, every row leaving), dynamo recompiles once with those sizes
    symbolic, and that graph then serves every size (CUDA graphs still record one replay per size)."""
    if model not in _compiled_steps:
        mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else None
        _compiled_steps[model] = torch.compile(model.decode_step, mode=mode)
    return _compiled_steps[model]


def mark_cache_static(cache):
    """Tell torch.compile that the cache's tensors are static inputs (torch._dynamo.mark_static_address, as
    transformers' StaticCache does). The step writes into them in place, and CUDA graphs skip any graph that
    mutates an input unless that input is static ("skipping cudagraphs due to mutated inputs"), so without this
    "reduce-overhead" would run without graphs. Unguarded: a new cache (a new batch, rows leaving) does not
    recompile; its graph is recorded again for the new addresses."""
    for tensor in cache.k + cache.v + [cache.doc]:
        torch._dynamo.mark_static_address(tensor)


class DecodeBatch:
    """Sequences decoding together through one KV cache, one token each per `step`; sequences may join
    (`add`) between any two steps and leave as soon as they finish: continuous batching.

    Every row is right-aligned in the cache: its prompt ends in the same column as every other row's
    latest token, pads (document id 0) fill the columns before it, and its positions count from its own
    first token, so what a row computes never depends on the other rows (as in `left_pad`). A joining group
    is prefilled on its own, then its cache is copied beside the running rows', the narrower side padded on
    the left; finished rows are dropped, and so are the columns that only they used."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.config = model.config
        self.device = model.tok_embeddings.weight.device
        self.compile = compile
        self.decode_step = compiled_decode_step(model) if compile else model.decode_step
        self.seqs: list[Sequence] = []
        self.cache = None
        self.logits = None  # [B, V] next-token logits of every row
        self.next_pos = None  # [B] the position of every row's next token

    def remaining(self, seq: Sequence) -> int:
        return seq.max_new_tokens - len(seq.tokens)

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]):
        """Prefill `seqs` (one forward pass for all of them) and let them decode from the next step on."""
        if not seqs:
            return
        for seq in seqs:
            if len(seq.prompt) + seq.max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"generate: a prompt of {len(seq.prompt)} tokens + max_new_tokens "
                                 f"({seq.max_new_tokens}) exceeds the model's max_seq_len {self.config.max_seq_len}")
        pad_id = self.config.pad_id if self.config.pad_id is not None else 0
        ids, pos, doc = left_pad([s.prompt for s in seqs], pad_id, self.device)
        room = max(self.remaining(s) for s in seqs + self.seqs)
        # Alone, the group's cache is the batch's (no copy); joining, it holds just the prompts.
        cache = self.model.new_cache(len(seqs), ids.shape[1] + (room if not self.seqs else 0))
        # Only the last column's logits are needed: the head runs on it alone (a [B, T, V] tensor can be large).
        logits = self.model.output(self.model.hidden_states(ids, position_ids=pos, doc_ids=doc, cache=cache)[:, -1])
        for seq in seqs:
            if seq.sampling.seed is not None and seq.sampling.temperature > 0:
                seq.generator = torch.Generator(device=self.device)
                seq.generator.manual_seed(seq.sampling.seed)
            if seq.sampling.repetition_penalty != 1.0:
                seq.seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.prompt, device=self.device)] = True
        next_pos = pos[:, -1] + 1
        if self.seqs:
            cache = self._merged(cache, room)
            logits, next_pos = torch.cat([self.logits, logits]), torch.cat([self.next_pos, next_pos])
        self.seqs, self.cache, self.logits, self.next_pos = self.seqs + list(seqs), cache, logits, next_pos

    def _merged(self, joining, room: int):
        """One cache of the running rows then the joining ones, right-aligned, with `room` columns to grow."""
        old, width = self.cache, max(self.cache.length, joining.length)
        merged = self.model.new_cache(len(self.seqs) + joining.doc.shape[0], width + room)
        for source, rows in ((old, slice(0, len(self.seqs))), (joining, slice(len(self.seqs), None))):
            n = source.length
            for merged_layer, source_layer in zip(merged.k + merged.v, source.k + source.v):
                merged_layer[rows, :, width - n:width] = source_layer[:, :, :n]
            merged.doc[rows, width - n:width] = source.doc[:, :n]
        merged.length = width
        return merged

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """Pick every running row's next token, then run the model on those that go on. Returns (sequence,
        token) for each row: token None when the sequence ended without one (a stop id, or it was finished
        from outside). Finished sequences leave the batch."""
        if not self.seqs:
            return []
        greedy = self.logits.argmax(-1).tolist()
        events, picked = [], []
        for b, seq in enumerate(self.seqs):
            token = None
            if not seq.done:
                s = seq.sampling
                token = greedy[b]
                if s.temperature > 0 or s.repetition_penalty != 1.0:
                    seen = seq.seen[None] if seq.seen is not None else None
                    logits = process_logits(self.logits[b:b + 1], seen, s.temperature, s.top_k, s.top_p,
                                            s.repetition_penalty)
                    token = pick_next(logits, s.temperature, seq.generator).item()
                if seq.seen is not None:
                    seq.seen[token] = True
                if not seq.accept(token):
                    token = None
            events.append((seq, token))
            picked.append(token)
        keep = [b for b, seq in enumerate(self.seqs) if not seq.done]
        if len(keep) < len(self.seqs):
            self._keep_rows(keep)
        if self.seqs:
            step_ids = torch.tensor([[picked[b]] for b in keep], device=self.device)
            column = torch.tensor([self.cache.length], device=self.device)
            if self.compile:
                mark_cache_static(self.cache)
            self.logits = self.decode_step(step_ids, self.next_pos[:, None], self.cache, column)
            self.cache.length += 1
            self.next_pos = self.next_pos + 1
        return events

    def _keep_rows(self, keep: list[int]):
        """Drop the other rows, and the leading columns that none of the kept rows uses."""
        self.seqs = [self.seqs[b] for b in keep]
        if not keep:
            self.cache = self.logits = self.next_pos = None
            return
        rows = torch.tensor(keep, device=self.device)
        cache = self.cache
        used = cache.doc[rows, :cache.length].ne(0).any(0)
        first = int(used.nonzero()[0].item())
        cache.k = [k[rows, :, first:] for k in cache.k]
        cache.v = [v[rows, :, first:] for v in cache.v]
        cache.doc = cache.doc[rows, first:]
        cache.length -= first
        self.next_pos = self.next_pos[rows]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, eos_id=None, stop_strings=None, tokenizer=None, seed=None,
             stream=None, compile=False):
    """Continue each prompt (a list of token ids); returns the new tokens of each, list[list[int]].

    temperature 0 = greedy. eos_id: int or list of ids that end a row, default the model's
    config.eos_ids (or config.eos_id); pass [] to always generate max_new_tokens. The stop token
    is not returned.
    stop_strings: a row also ends once its decoded text contains one of them (needs `tokenizer`);
    tokens from the one that starts the stop string onwards are trimmed. seed: every row samples from its
    own torch.Generator seeded with it, so a row's samples are those it gets alone, whatever else is in the
    batch. stream(row, token_id) is called for every token as it is accepted (before any stop-string
    trimming). compile: decode through torch.compile of the model's step (see `compiled_decode_step`); the first
    call for a batch shape compiles (seconds to a minute on a CPU), later ones reuse it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if eos_id is None:  # every EOS id the model declares (Llama-3 Instruct lists several)
        eos_id = model.config.eos_ids or model.config.eos_id
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed)
    seqs = [Sequence(p, max_new_tokens, sampling, eos_ids, stop_strings or (), tokenizer) for p in prompts]
    row_of = {id(seq): b for b, seq in enumerate(seqs)}
    was_training = model.training
    model.eval()
    try:
        batch = DecodeBatch(model, compile=compile)
        batch.add(seqs)
        while batch.seqs:
            for seq, token in batch.step():
                if token is not None and stream is not None:
                    stream(row_of[id(seq)], token)
    finally:
        model.train(was_training)
    return [seq.tokens for seq in seqs]
