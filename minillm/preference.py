"""What DPO, IPO and KTO need besides ORPO's pairs: KTO's unpaired examples, and the reference log-probs.

Reference log-probs (log pi_ref of every example under the initial model) are computed ONCE, before the first
training step, by the model that is about to be trained: one no-grad pass over the training and validation
sets, each rank scoring its share. They are stored in the run directory (OUT_DIR/reference_logps.safetensors,
one float32 tensor per split and side, indexed by example number) together with the data fingerprint, and read
back on --resume, where the model is no longer the initial one. Training therefore holds one model, as ORPO.

KTO examples: JSONL records {"prompt": str | [messages] (or "messages": [messages]), "completion": str |
assistant message, "label": true (desirable) | false (undesirable)}; a preference pair {"prompt", "chosen",
"rejected"} gives one desirable and one undesirable example. KTO's reference point needs mismatched sequences
(x_i, y'_i): as TRL, y'_i is the completion of the example before i (here in file order, skipping examples
with the same prompt, so a pair's two halves are never each other's partner). They are fixed when the data is
read, so their reference log-probs are computed with the others.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minillm.chat_format import render, resolve_template
from minillm.files import atomic_write, read_jsonl
from minillm.losses import IGNORE_INDEX
from minillm.run_dir import REFERENCE_LOGPS
from minillm.sft_data import (labels_from_mask, pack_examples, prompt_messages, reply_text, step_slices,
                              steps_per_epoch)


# ============================================================================ KTO examples

def kto_parts(record) -> list[tuple[list[dict], str, bool]]:
    """[(prompt messages, completion, desirable)] of one KTO record: one for an unpaired record, two (chosen
    desirable, rejected undesirable) for a preference pair. ValueError names the problem (callers add file:line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt_field = "prompt" if "prompt" in record else "messages"
    if prompt_field not in record:
        raise ValueError("missing field 'prompt' (or 'messages')")
    messages = prompt_messages(record[prompt_field], prompt_field)
    if "chosen" in record or "rejected" in record:
        for field in ("chosen", "rejected"):
            if field not in record:
                raise ValueError(f"missing field '{field}' (a preference pair needs both 'chosen' and 'rejected')")
        return [(messages, reply_text(record["chosen"], "chosen", messages), True),
                (messages, reply_text(record["rejected"], "rejected", messages), False)]
    for field in ("completion", "label"):
        if field not in record:
            raise ValueError(f"missing field '{field}' (an unpaired KTO record is prompt, completion, label)")
    if not isinstance(record["label"], bool):
        raise ValueError(f"'label' must be true (desirable) or false (undesirable), got {record['label']!r}")
    return [(messages, reply_text(record["completion"], "completion", messages), record["label"])]


def load_kto_examples(path, tokenizer, seq_len: int, template: str = "auto") -> tuple[list[dict], dict]:
    """The examples of one JSONL file: {"prompt_ids", "ids", "labels" (aligned to ids, -100 on the prompt; the
    completion and its end-of-turn token labelled), "desirable"}, and stats (dropped_identical: a pair whose
    chosen == rejected, both halves dropped; dropped_no_room: the prompt leaves no room for a completion token;
    truncated: a completion cut to fit seq_len; desirable, undesirable: the counts kept)."""
    template = resolve_template(template, tokenizer)
    examples = []
    stats = {"desirable": 0, "undesirable": 0, "dropped_identical": 0, "dropped_no_room": 0, "truncated": 0}
    for line_no, record in read_jsonl(path):
        try:
            parts = kto_parts(record)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        if len(parts) == 2 and parts[0][1] == parts[1][1]:
            stats["dropped_identical"] += 1
            continue
        for messages, completion, desirable in parts:
            prompt_ids, _ = render(messages, tokenizer, template=template, add_generation_prompt=True)
            if len(prompt_ids) + 1 > seq_len:
                stats["dropped_no_room"] += 1
                continue
            ids, mask = render(messages + [{"role": "assistant", "content": completion}], tokenizer,
                               template=template, train_on="last")
            end = max(i for i, m in enumerate(mask) if m) + 1  # nothing after the end-of-turn token is scored
            if end > seq_len:
                stats["truncated"] += 1
            ids, mask = ids[:min(end, seq_len)], mask[:min(end, seq_len)]
            examples.append({"prompt_ids": prompt_ids, "ids": ids, "labels": labels_from_mask(ids, mask),
                             "desirable": desirable})
            stats["desirable" if desirable else "undesirable"] += 1
    return examples, stats


def add_kl_sequences(examples: list[dict], seq_len: int) -> list[dict]:
    """Give every example its mismatched sequence for KTO's reference point: its own prompt followed by the
    completion of the nearest example before it (cyclically, in file order) whose prompt differs (any other
    example when all prompts are the same), cut to seq_len. "kl_ids", "kl_labels" are added in place."""
    n = len(examples)
    for i, example in enumerate(examples):
        partner = next((examples[(i - k) % n] for k in range(1, n)
                        if examples[(i - k) % n]["prompt_ids"] != example["prompt_ids"]), examples[(i - 1) % n])
        start = len(partner["prompt_ids"])
        ids = (example["prompt_ids"] + partner["ids"][start:])[:seq_len]
        labels = ([IGNORE_INDEX] * len(example["prompt_ids"]) + partner["labels"][start:])[:seq_len]
        example["kl_ids"], example["kl_labels"] = ids, labels
    return examples


def load_kto_files(paths: list[str], tokenizer, seq_len: int, report=print, template: str = "auto") -> list[dict]:
    """load_kto_examples over several files, then their mismatched sequences (`add_kl_sequences`) over all of
    them; report(line) is told what each file gave and dropped."""
    examples = []
    for path in paths:
        got, stats = load_kto_examples(path, tokenizer, seq_len, template)
        examples += got
        report(f"{path}: {len(got)} examples" + "".join(f", {k} {v}" for k, v in stats.items() if v))
    return add_kl_sequences(examples, seq_len)


def kto_batch(examples: list[dict], indices: list[int], pad_id: int, mismatched: bool = False) -> dict:
    """Rows of the examples `indices` ([B, T], T = the longest), or with mismatched=True of their KL sequences.
    `labels` and `response_mask` cover the completion + end-of-turn token, `desirable` [B] is each example's
    label, `example_mask` [B] False for padding (index -1: any real example's tokens, nothing scored)."""
    key = "kl_" if mismatched else ""
    rows = [(examples[max(i, 0)][f"{key}ids"], examples[max(i, 0)][f"{key}labels"]) for i in indices]
    batch = pack_examples(rows, max(len(ids) for ids, _ in rows), pad_id=pad_id, pack=False)
    real = torch.tensor([i >= 0 for i in indices])
    batch["labels"][~real] = IGNORE_INDEX
    batch["response_mask"] = batch["labels"] != IGNORE_INDEX
    batch["example_mask"] = real
    batch["desirable"] = torch.tensor([examples[max(i, 0)]["desirable"] for i in indices])
    return batch


# ============================================================================ reference log-probs

def score_everything(score, n_items: int, micro_batch_size: int, rank: int, world_size: int, device
                     ) -> dict[str, torch.Tensor]:
    """{name: [n_items] float32} of `score(indices) -> {name: [len(indices)] tensor}` over every item, each
    scored once by one rank (the validation's slicing: every rank runs the same number of batches, padded
    with index -1, whose scores are dropped), then summed over ranks: zeros plus one value is exact."""
    out: dict[str, torch.Tensor] = {}
    for s in range(steps_per_epoch(n_items, micro_batch_size, 1, world_size)):
        indices = step_slices(n_items, s, micro_batch_size, 1, rank, world_size)[0]
        for name, values in score(indices).items():
            column = out.setdefault(name, torch.zeros(n_items, dtype=torch.float32, device=device))
            for i, v in zip(indices, values.float()):
                if i >= 0:
                    column[i] = v
    if dist.is_initialized() and dist.get_world_size() > 1:
        for name in sorted(out):  # the same order on every rank
            dist.all_reduce(out[name])
    return {name: v.cpu() for name, v in out.items()}


def data_identity(data: dict[str, dict]) -> str:
    """What the stored log-probs are checked against: each data file's sha256 (files.fingerprints), not its
    mtime, so a copied run directory and data keep their reference log-probs."""
    return json.dumps({path: f["sha256"] for path, f in sorted(data.items())})


def save_reference(out_dir, tensors: dict[str, torch.Tensor], data: dict[str, dict], rank: int):
    """Rank 0 writes OUT_DIR/reference_logps.safetensors atomically, with the data identity in its metadata."""
    if rank == 0:
        atomic_write(Path(out_dir) / REFERENCE_LOGPS,
                     save({k: v.contiguous() for k, v in tensors.items()}, metadata={"data": data_identity(data)}))
    if dist.is_initialized():
        dist.barrier()


def load_reference(out_dir, data: dict[str, dict], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The stored reference log-probs of a resumed run; ValueError (one line naming the file) if they are
    missing, unreadable, or were computed for other data or another number of examples (`sizes`: tensor name ->
    examples in this run)."""
    path = Path(out_dir) / REFERENCE_LOGPS
    if not path.exists():
        raise ValueError(f"{path}: missing; the reference log-probs of the initial model are computed at the start "
                         "of a run and cannot be recomputed from a checkpoint (start the run again without --resume)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if metadata.get("data") != data_identity(data):
        raise ValueError(f"{path}: the reference log-probs were computed for other data files or contents; a resume "
                         "must train on the data the run started with (start a new run for new data)")
    for name, n in sizes.items():
        if name not in tensors or tensors[name].shape != (n,):
            got = tuple(tensors[name].shape) if name in tensors else "nothing"
            raise ValueError(f"{path}: '{name}' holds {got}, expected {n} examples (other --seq-len or --template?)")
    return tensors
