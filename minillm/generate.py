"""Text generation with a KV cache: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded to a common length, so every row's next token sits in the last column.
Padding must not change the result, so (a) each row's positions restart at 0 on its first real
token and (b) pads get document id 0 and real tokens document id 1: attention never crosses
document ids, so real tokens never see the pads (and vice versa). A batched call therefore
gives the same tokens as generating each prompt alone.

Sampling follows Hugging Face semantics and order: repetition penalty, temperature, top-k, top-p
(see `process_logits`). The LLAMMAS paper samples with temperature 0.6, top_p 0.9,
repetition_penalty 1.2.
"""
from __future__ import annotations

import torch


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


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, eos_id=None, stop_strings=None, tokenizer=None, seed=None,
             stream=None):
    """Continue each prompt (a list of token ids); returns the new tokens of each, list[list[int]].

    temperature 0 = greedy. eos_id: int or list of ids that end a row, default the model's
    config.eos_ids (or config.eos_id); pass [] to always generate max_new_tokens. The stop token
    is not returned.
    stop_strings: a row also ends once its decoded text contains one of them (needs `tokenizer`);
    tokens from the one that starts the stop string onwards are trimmed. seed: sampling draws
    from a private torch.Generator, so equal seeds give equal samples. stream(row, token_id) is
    called for every token as it is accepted (before any stop-string trimming).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode the generated text")
    config = model.config
    if eos_id is None:  # every EOS id the model declares (Llama-3 Instruct lists several)
        eos_id = config.eos_ids or config.eos_id
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    device = model.tok_embeddings.weight.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    B, V = len(prompts), config.vocab_size
    pad_id = config.pad_id if config.pad_id is not None else 0
    ids, pos, doc = left_pad(prompts, pad_id, device)
    if ids.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(f"generate: longest prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_seq_len {config.max_seq_len}")
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row has seen so far (pads excluded)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, doc.bool())
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
    out = [[] for _ in range(B)]
    done = [False] * B
    next_pos = pos[:, -1] + 1
    try:
        # Prefill the whole prompt; only the last column's logits are needed, so the head runs
        # on that column alone (a [B, T, V] logits tensor can be large for big vocabularies).
        hidden = model.hidden_states(ids, position_ids=pos, doc_ids=doc, cache=cache)
        logits = model.output(hidden[:, -1])
        for step in range(max_new_tokens):
            logits = process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
            token = pick_next(logits, temperature, generator)
            for b, t in enumerate(token.tolist()):
                if done[b]:
                    continue
                if t in eos_ids:
                    done[b] = True
                    continue
                out[b].append(t)
                if stream is not None:
                    stream(b, t)
                if stop_strings:
                    keep = stop_string_cut(out[b], stop_strings, tokenizer)
                    if keep is not None:
                        out[b], done[b] = out[b][:keep], True
            if all(done) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(B, device=device), token] = True
            # Finished rows keep decoding (their output is ignored) so the batch stays rectangular.
            step_ids = token[:, None]
            hidden = model.hidden_states(step_ids, position_ids=next_pos[:, None],
                                         doc_ids=torch.ones_like(step_ids), cache=cache)
            logits = model.output(hidden[:, -1])
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out
