"""Instruction and preference data for SFT and ORPO: load -> tokenize with loss masks -> pack or pair ->
slice per rank.

    records = load_sft_jsonl(path)                                  # validated Alpaca / chat records
    examples, stats = tokenize_sft_examples(records, tok, seq_len)  # (ids, labels) with the loss mask
    rows = pack_examples(examples, seq_len, pad_id)                 # [R, T] rows, several examples each
    batch = take_rows(rows, step_slices(R, step, B, A, rank, W)[k]) # rank's k-th micro-batch of a step

    pairs, stats = load_preferences(path, tok, seq_len)            # (chosen ids/labels, rejected ids/labels)
    batch = pair_batch(pairs, indices, nll_on_prompt, pad_id)      # [chosen rows; rejected rows]

Labels convention: examples are (ids, labels) with labels ALIGNED to ids, labels[i] = ids[i] where token i
is trained on and -100 where not (chat_format.render gives the mask); pack_examples and pair_batch shift
them, so in a batch labels[t] is the target of position t. Every rank takes the same number of
micro-batches (ZeRO-3's collectives need that): slices past the end are index -1, a padding row or pair
without targets.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np
import torch

from minillm.chat_format import TRAIN_ON, check_messages, check_record, render, resolve_template
from minillm.files import read_jsonl
from minillm.losses import IGNORE_INDEX
from minillm.pretrain_data import empty_row, stack_rows

TRUNCATE = ("right", "left", "drop")

# ============================================================================ SFT examples

def load_sft_jsonl(path, training: bool = True) -> list[dict]:
    """SFT records of a JSONL file, each Alpaca or chat (detected per record), validated: a missing
    'output' / 'messages' field, an unknown role, a conversation not ending with an assistant turn (when
    training), an empty file or bad JSON raise ValueError('path:LINE: ...')."""
    records = []
    for line_no, record in read_jsonl(path):
        try:
            if not isinstance(record, dict):  # a file holds objects; bare message lists are for the API
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            check_record(record, training)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        records.append(record)
    return records


def truncate_example(ids: list[int], mask: list[int], seq_len: int, side: str, bos_id: int | None = None):
    """Cut an example to seq_len tokens. 'right' keeps the start (the end of the reply is lost, maybe its
    end-of-turn token); 'left' keeps the last tokens (the start of the prompt is lost), after the example's
    first token when that is bos_id."""
    if side == "right":
        return ids[:seq_len], mask[:seq_len]
    head = 1 if bos_id is not None and ids[:1] == [bos_id] else 0
    keep = seq_len - head
    return ids[:head] + ids[len(ids) - keep:], mask[:head] + mask[len(mask) - keep:]


def labels_from_mask(ids: list[int], mask: list[int]) -> list[int]:
    """Aligned labels: the token where the loss covers it, -100 elsewhere. Position 0 is never a target
    (pack_examples shifts labels left by one), so it is always -100."""
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def tokenize_sft_examples(records, tokenizer, seq_len: int, truncate: str = "right", train_on: str = "assistant",
                          template: str = "auto") -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Render records into (ids, labels) examples of at most seq_len tokens with chat_format.render's
    `template`; labels aligned with ids (-100 = no loss; pack_examples shifts them).

    truncate: what to do with an example longer than seq_len: 'right' (keep the start), 'left' (keep BOS
    and the end) or 'drop'. An example left without a single trained token (e.g. the reply cut away) is
    dropped, never trained on (it would give 0/0 = NaN as a per-sequence mean).
    Returns (examples, stats) with stats counting truncated, dropped_too_long and
    dropped_no_trainable_tokens."""
    if truncate not in TRUNCATE:
        raise ValueError(f"unknown truncate {truncate!r} (expected right, left or drop)")
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown train_on {train_on!r} (expected assistant, last or all)")
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len} is too short for a prompt and a reply")
    template = resolve_template(template, tokenizer)
    examples = []
    stats = {"truncated": 0, "dropped_too_long": 0, "dropped_no_trainable_tokens": 0}
    for record in records:
        ids, mask = render(record, tokenizer, template=template, train_on=train_on)
        if len(ids) > seq_len:
            if truncate == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, mask = truncate_example(ids, mask, seq_len, truncate, tokenizer.bos_id)
            stats["truncated"] += 1
        if not any(mask[1:]):
            stats["dropped_no_trainable_tokens"] += 1
            continue
        examples.append((ids, labels_from_mask(ids, mask)))
    return examples, stats


def load_sft_examples(paths: list[str], tokenizer, seq_len: int, report=print, **render_options) -> list:
    """tokenize_sft_examples over the records of several JSONL files; report(line) is told, per file, how
    many examples it gave and what was truncated or dropped (render_options: truncate, train_on, template)."""
    examples = []
    for path in paths:
        got, stats = tokenize_sft_examples(load_sft_jsonl(path), tokenizer, seq_len, **render_options)
        examples += got
        report(f"{path}: {len(got)} examples" + "".join(f", {k} {v}" for k, v in stats.items() if v))
    if not examples:
        raise ValueError(f"{', '.join(paths)}: no trainable examples")
    return examples


# ============================================================================ preference pairs

def preference_parts(record) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a preference record

        {"prompt": str | [messages], "chosen": str | assistant message | [...messages, assistant message],
         "rejected": same as chosen}

    A string prompt is one user turn. A chosen/rejected list (the UltraFeedback layout) is the whole
    conversation: it must start with the prompt's messages and end with one assistant message.
    ValueError names the problem (callers prefix file and line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("prompt", "chosen", "rejected"):
        if field not in record:
            raise ValueError(f"missing field '{field}'")
    messages = prompt_messages(record["prompt"], "prompt")
    return messages, reply_text(record["chosen"], "chosen", messages), reply_text(record["rejected"], "rejected", messages)


def prompt_messages(prompt, field: str) -> list[dict]:
    """The messages of a prompt field: a string is one user turn; a list of messages must end with the turn to
    answer. ValueError names the field."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        try:
            check_messages(prompt, training=False)
        except ValueError as e:
            raise ValueError(f"'{field}': {e}") from None
        messages = prompt
        if messages[-1]["role"] == "assistant":
            raise ValueError(f"'{field}' ends with an assistant turn; it must end with the turn to answer")
    if not (messages[-1]["content"] or "").strip():
        raise ValueError(f"empty '{field}'")
    return messages


def reply_text(value, field: str, messages: list[dict]) -> str:
    """The reply of a chosen/rejected/completion field: a string, an assistant message, or a conversation that
    starts with the prompt's `messages` and ends with one assistant message. ValueError names the field."""
    if isinstance(value, list):
        if len(value) > 1 and value[:-1] != messages:
            raise ValueError(f"'{field}' is a conversation that does not start with the prompt")
        value = value[-1] if value else None
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise ValueError(f"'{field}' has role {value.get('role')!r}, expected 'assistant'")
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string or an assistant message")
    if not value.strip():
        raise ValueError(f"empty '{field}' response")
    return value


def render_preference(record, tokenizer, seq_len: int, template: str = "auto") -> dict | None:
    """Chosen and rejected examples of one preference record, rendered by `render` (train_on='last'), so
    both start with the identical prompt ids (asserted). Returns {"chosen": (ids, labels), "rejected":
    (ids, labels), "prompt_len": int, "truncated": bool} with labels aligned to ids (-100 on the prompt,
    the reply and its EOS labelled), or None when the prompt leaves no room for a reply token within
    seq_len. A sequence ends with the reply's end-of-turn token (what a template puts after it is never
    scored, so it is not kept); a reply that does not fit is cut from the right (its EOS is then lost)."""
    messages, chosen, rejected = preference_parts(record)
    prompt_ids, _ = render(messages, tokenizer, template=template, add_generation_prompt=True)
    if len(prompt_ids) + 1 > seq_len:
        return None
    out = {"prompt_len": len(prompt_ids), "truncated": False}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = render(messages + [{"role": "assistant", "content": reply}], tokenizer, template=template,
                           train_on="last")
        if ids[:len(prompt_ids)] != prompt_ids:  # encode_parts guarantees it; a cheap check against regressions
            raise AssertionError("rendered conversation does not start with its inference prompt")
        end = max(i for i, m in enumerate(mask) if m) + 1
        ids, mask = ids[:end], mask[:end]
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            out["truncated"] = True
        out[name] = (ids, labels_from_mask(ids, mask))
    return out


def load_preferences(path, tokenizer, seq_len: int, template: str = "auto", report=None) -> tuple[list[tuple], dict]:
    """Preference pairs of a JSONL file as (chosen_ids, chosen_labels, rejected_ids, rejected_labels)
    (labels aligned to ids, -100 on the prompt), and stats:
      dropped_identical  chosen == rejected: no preference to learn (log-odds 0); dropped
      dropped_no_room    the prompt leaves no room for the reply within seq_len
      truncated          a reply cut to fit seq_len
    An empty chosen/rejected reply, a missing field or bad JSON raise ValueError('path:LINE: ...');
    report(line), when given, is told each identical pair's file and line. template: chat_format.render's."""
    template = resolve_template(template, tokenizer)
    pairs, stats = [], {"dropped_identical": 0, "dropped_no_room": 0, "truncated": 0}
    for line_no, record in read_jsonl(path):
        try:
            _, chosen, rejected = preference_parts(record)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        if chosen == rejected:
            stats["dropped_identical"] += 1
            if report is not None:
                report(f"{path}:{line_no}: chosen and rejected are identical; pair dropped")
            continue
        pair = render_preference(record, tokenizer, seq_len, template)
        if pair is None:
            stats["dropped_no_room"] += 1
            continue
        stats["truncated"] += pair["truncated"]
        pairs.append((*pair["chosen"], *pair["rejected"]))
    return pairs, stats


def load_preference_files(paths: list[str], tokenizer, seq_len: int, report=print, template: str = "auto"
                          ) -> list[tuple]:
    """load_preferences over several files; report(line) is told what each gave and dropped."""
    pairs = []
    for path in paths:
        got, stats = load_preferences(path, tokenizer, seq_len, template, report=report)
        pairs += got
        report(f"{path}: {len(got)} pairs" + "".join(f", {k} {v}" for k, v in stats.items() if v))
    return pairs


# ============================================================================ rows and batches

def pack_examples(examples, seq_len: int, pad_id: int = 0, pack: bool = True) -> dict[str, torch.Tensor]:
    """SFT rows from examples = [(ids, labels), ...], several examples per row with document masking.

    labels are aligned with ids, NOT shifted (labels[i] = ids[i] where token i is trained on, -100 where
    not, as a loss-mask renderer produces them); this function shifts them, so in the output labels[t] is
    the target of position t and each example's last position predicts nothing (never the next example).
    Packing is best-fit in the given order (`row_members`), so rows are well filled and no example is split;
    pack=False gives one example per row (same labels, so packed and unpacked training see the same loss).
    Examples longer than seq_len are the caller's to truncate or drop (ValueError here). Position ids
    restart at 0 for every example; the padding at the end of a row has label -100 and a doc id of its own.
    """
    return build_rows(examples, row_members(examples, seq_len, pack), seq_len, pad_id)


def row_members(examples, seq_len: int, pack: bool = True) -> list[list[int]]:
    """Which examples go into which row, [[example index, ...] per row]: best-fit in the given order (each
    example goes to the fullest row that still has room, or a new row); pack=False: one example per row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i, (ids, labels) in enumerate(examples):
        n = len(ids)
        if n != len(labels):
            raise ValueError(f"example {i}: {n} ids but {len(labels)} labels")
        if n == 0:
            raise ValueError(f"example {i} is empty")
        if n > seq_len:
            raise ValueError(f"example {i}: {n} tokens do not fit seq_len {seq_len}; truncate or drop it first")
        j = bisect.bisect_left(free, (n, -1)) if pack else len(free)
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
        else:
            rows.append([i])
            room, r = seq_len, len(rows) - 1
        if pack and room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def build_rows(examples, rows: list[list[int]], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The [R, T] batch dict of `row_members`' rows (pack_examples' docstring tells the layout)."""
    out = []
    for members in rows:
        row = empty_row(seq_len, pad_id)
        at = 0
        for doc, i in enumerate(members):
            ids, labels = examples[i]
            n = len(ids)
            row["input_ids"][at:at + n] = np.asarray(ids, dtype=np.int64)
            row["labels"][at:at + n - 1] = np.asarray(labels, dtype=np.int64)[1:]
            row["position_ids"][at:at + n] = np.arange(n)
            row["doc_ids"][at:at + n] = doc
            at += n
        row["doc_ids"][at:] = len(members)
        row["position_ids"][at:] = np.arange(seq_len - at)
        out.append(row)
    if not out:
        raise ValueError("pack_examples: no examples")
    return stack_rows(out)


class SFTStep(NamedTuple):
    """One optimizer step of an SFT run, known by its number alone (all a checkpoint records)."""
    stage: int  # curriculum stage, from 0
    epoch: int  # epoch of the stage, from 0
    step_in_epoch: int  # which of the epoch's global batches (step_slices)
    stage_step: int  # step of the stage's LR schedule, from 0
    stage_steps: int  # steps of the stage: its schedule's length


class SFTPlan:
    """The whole SFT run planned upfront: every (stage, epoch) shuffles its examples with a seeded order and is
    packed into rows once (the row assignment is kept; the rows themselves are built when the epoch starts),
    so `steps[i]` tells optimizer step i's stage, epoch and schedule, and `micro_batches(i)` its rows. Each
    stage has its own LR schedule (warmup, then decay to min_lr)."""

    def __init__(self, stages: list[list], epochs: int, seq_len: int, pad_id: int, pack: bool, seed: int,
                 micro_batch_size: int, grad_accum: int, rank: int, world_size: int):
        self.stages, self.seq_len, self.pad_id = stages, seq_len, pad_id
        self.micro_batch_size, self.grad_accum, self.rank, self.world_size = micro_batch_size, grad_accum, rank, world_size
        self.epochs: dict[tuple[int, int], list[list[int]]] = {}  # (stage, epoch) -> example indices per row
        self.steps: list[SFTStep] = []
        for stage, examples in enumerate(stages):
            for epoch in range(epochs):
                order = epoch_order(len(examples), 1000 * stage + epoch, seed)
                self.epochs[stage, epoch] = [[order[i] for i in row] for row in
                                             row_members([examples[i] for i in order], seq_len, pack)]
            counts = [steps_per_epoch(len(self.epochs[stage, e]), micro_batch_size, grad_accum, world_size)
                      for e in range(epochs)]
            for epoch, n in enumerate(counts):
                self.steps += [SFTStep(stage, epoch, s, sum(counts[:epoch]) + s, sum(counts)) for s in range(n)]
        self._rows_of, self._rows = None, None

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of optimizer step `step` (rows of padding past the epoch's end)."""
        stage, epoch, step_in_epoch = self.steps[step][:3]
        if self._rows_of != (stage, epoch):  # the epoch's rows, built once when it starts
            self._rows_of = (stage, epoch)
            self._rows = build_rows(self.stages[stage], self.epochs[stage, epoch], self.seq_len, self.pad_id)
        return [take_rows(self._rows, idx) for idx in step_slices(len(self.epochs[stage, epoch]), step_in_epoch,
                                                                   self.micro_batch_size, self.grad_accum, self.rank,
                                                                   self.world_size)]


def sft_validation_batches(examples, seq_len: int, pad_id: int, pack: bool, micro_batch_size: int, rank: int,
                           world_size: int) -> list[dict]:
    """This rank's share of the held-out rows as micro-batches: every row scored once on any number of ranks."""
    rows = pack_examples(examples, seq_len, pad_id=pad_id, pack=pack)
    n_rows = rows["input_ids"].shape[0]
    return [take_rows(rows, idx) for idx in every_item_once(n_rows, micro_batch_size, rank, world_size)]


def epoch_order(n_items: int, epoch: int, seed: int) -> list[int]:
    """A seeded permutation per epoch: the same on every rank and after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_items, generator=g).tolist()


def steps_per_epoch(n_items: int, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps that cover n_items once (the last one may be partly padding)."""
    return max(1, -(-n_items // (micro_batch_size * grad_accum * world_size)))


def step_slices(n_items: int, step: int, micro_batch_size: int, grad_accum: int, rank: int,
                world_size: int) -> list[list[int]]:
    """Indices of this rank's micro-batches for optimizer step `step` of an epoch.

    Step s covers items [s*G, (s+1)*G), G = micro_batch_size * grad_accum * world_size; micro-batch k goes to
    ranks in turn. The items of a step depend only on G, so 4 micro-batches x 1 item, 1 x 4, or 2 ranks x 2
    all train on the same items. Indices past the end are -1: padding without targets."""
    per_micro = micro_batch_size * world_size
    out = []
    for k in range(grad_accum):
        first = step * micro_batch_size * grad_accum * world_size + k * per_micro + rank * micro_batch_size
        out.append([i if i < n_items else -1 for i in range(first, first + micro_batch_size)])
    return out


def every_item_once(n_items: int, micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of a pass that scores each of n_items once on any number of ranks (validation,
    reference log-probs): every rank gets the same number of micro-batches, padded with -1."""
    return [step_slices(n_items, s, micro_batch_size, 1, rank, world_size)[0]
            for s in range(steps_per_epoch(n_items, micro_batch_size, 1, world_size))]


def take_rows(rows: dict, indices: list[int]) -> dict:
    """Rows of a packed [R, T] batch dict; index -1 gives an all-padding row (label -100)."""
    idx = torch.tensor([max(i, 0) for i in indices])
    out = {k: v[idx].clone() for k, v in rows.items()}
    pad = torch.tensor([i < 0 for i in indices])
    if pad.any():
        out["labels"][pad] = IGNORE_INDEX
    return out


def pair_batch(pairs: list, indices: list[int], nll_on_prompt: bool, pad_id: int) -> dict:
    """Chosen rows then rejected rows, [2B, T] (T = the longest of them), for one forward pass (two passes
    through the model before one backward fail under DeepSpeed ZeRO: "gradient computed twice"; TRL's
    concatenated_forward does the same).

    `labels` are what the NLL term scores (the response + its end-of-turn token; with nll_on_prompt the
    prompt too, as TRL, never anything after the end-of-turn token), `response_mask` what the odds ratio
    averages over (response + end-of-turn token), `pair_mask` [B] is False for padding pairs (index -1:
    any real pair's tokens, nothing scored). Pairs are (chosen_ids, chosen_labels, rejected_ids,
    rejected_labels), labels aligned to ids, as `load_preferences` gives them."""
    halves = []
    for side in (0, 1):
        examples = [(pairs[max(i, 0)][2 * side], pairs[max(i, 0)][2 * side + 1]) for i in indices]
        width = max(len(ids) for ids, _ in examples)
        rows = pack_examples(examples, width, pad_id=pad_id, pack=False)
        rows["response_mask"] = rows["labels"] != IGNORE_INDEX
        if nll_on_prompt:  # every next token up to the end of the response, prompt included
            rows["labels"] = pack_examples([(ids, [t if n < _end(labels) else IGNORE_INDEX for n, t in enumerate(ids)])
                                            for ids, labels in examples], width, pad_id=pad_id, pack=False)["labels"]
        halves.append(rows)
    width = max(h["input_ids"].shape[1] for h in halves)
    batch = {k: torch.cat([_pad_right(halves[0][k], width, k), _pad_right(halves[1][k], width, k)])
             for k in halves[0]}
    real = torch.tensor([i >= 0 for i in indices])
    batch["pair_mask"] = real
    pad = ~torch.cat([real, real])
    batch["labels"][pad] = IGNORE_INDEX
    batch["response_mask"][pad] = False
    return batch


def _end(labels: list[int]) -> int:
    """One past the last labelled position: where the response's end-of-turn token is."""
    return max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1


def _pad_right(x: torch.Tensor, width: int, key: str) -> torch.Tensor:
    fill = {"labels": IGNORE_INDEX, "doc_ids": -1, "response_mask": False}.get(key, 0)
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], dim=1)
