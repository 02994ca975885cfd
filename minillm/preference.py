"""Preference alignment's data and objective besides ORPO's pairs: KTO's unpaired examples, the reference
log-probs, and `PreferenceObjective`, what train_orpo.py's loop calls for --objective orpo|dpo|ipo|kto.

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

PreferenceObjective holds the training and validation sets, the options and the reference log-probs, and gives
the loop the pairs of each step (one seeded shuffle per epoch, whole global batches only), their micro-batches
with the steps' global token and pair counts, KTO's reference point, each micro-batch's loss and metric sums
(minillm/losses.py writes the objectives out), the logged means and a validation pass; the loop itself
(forward, backward, optimizer step) stays in train_orpo.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minillm.chat_format import render, resolve_template
from minillm.engine import all_reduce_sum, batch_to, end_validation, model_inputs
from minillm.files import atomic_write, read_jsonl
from minillm.losses import (IGNORE_INDEX, dpo_loss, ipo_loss, kto_loss, kto_reference_point, orpo_loss, orpo_means,
                            pair_logprobs, reference_means, sequence_logprobs, split_pairs)
from minillm.run_dir import REFERENCE_LOGPS
from minillm.sft_data import (epoch_order, every_item_once, labels_from_mask, pack_examples, pair_batch,
                              prompt_messages, reply_text, step_slices)


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
    for indices in every_item_once(n_items, micro_batch_size, rank, world_size):
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


# ============================================================================ the objective of a step (train_orpo.py)

# what the step line shows besides loss, lr and speed (every metric is in metrics.jsonl)
LOGGED = {"orpo": ("reward_accuracy", "margin", "val_loss", "val_reward_accuracy"),
          "kto": ("kl", "rewards/margins", "val_loss", "val_rewards/margins")}
LOGGED["dpo"] = LOGGED["ipo"] = ("rewards/accuracies", "rewards/margins", "val_loss", "val_rewards/accuracies")


def sequence_sums(engine, batch) -> torch.Tensor:
    """Forward: the summed log-prob of each row's response tokens [rows] (DPO, IPO, KTO compare these)."""
    return sequence_logprobs(-engine(**model_inputs(batch), reduction="none"), batch["response_mask"])[0]


class PreferenceObjective:
    """train_orpo.py's data and --objective: `splits` {"train": items, "valid": items} (pairs, or KTO's examples),
    cfg (the ORPOOptions: objective, its weights, micro_batch_size, grad_accum, epochs, max_steps, seed), the
    tokenizer's pad id, this rank, the number of ranks and the device. `reference` ("train/chosen" -> log pi_ref
    of every training pair's chosen response, ...) is empty until the run computes or reads it (DPO, IPO, KTO;
    `sides` names what is kept per example, nothing for ORPO)."""

    def __init__(self, cfg, splits: dict[str, list], pad_id: int, rank: int, world_size: int, device):
        self.cfg, self.splits, self.pad_id, self.device = cfg, splits, pad_id, device
        self.rank, self.world_size = rank, world_size
        self.sides = {"orpo": (), "kto": ("completion", "kl")}.get(cfg.objective, ("chosen", "rejected"))
        self.reference: dict[str, torch.Tensor] = {}
        items_per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
        if len(splits["train"]) < items_per_step:
            raise ValueError(f"{cfg.train_data}: {len(splits['train'])} usable "
                             f"{'examples' if cfg.objective == 'kto' else 'pairs'}, fewer than one global batch "
                             f"({items_per_step} = micro_batch_size x grad_accum x ranks)")
        # Whole global batches only: the incomplete last one of an epoch is skipped (its pairs come back in the
        # next epoch's order), so every training step weighs the same number of pairs.
        self.epoch_steps = len(splits["train"]) // items_per_step
        self.total_steps = min(cfg.epochs * self.epoch_steps, cfg.max_steps or cfg.epochs * self.epoch_steps)
        self._order_epoch, self._order = None, None

    def step_indices(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the training items of this rank's micro-batches) of optimizer step `step`: one seeded shuffle
        per epoch, the same on every rank and after a resume."""
        epoch, step_in_epoch = divmod(step, self.epoch_steps)
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, epoch_order(len(self.splits["train"]), epoch, self.cfg.seed)
        slices = step_slices(len(self.splits["train"]), step_in_epoch, self.cfg.micro_batch_size, self.cfg.grad_accum,
                             self.rank, self.world_size)
        return epoch, [[self._order[i] for i in idx] for idx in slices]

    def batch(self, split: str, indices: list[int], mismatched: bool = False) -> dict:
        """Rows of pairs (chosen, then rejected) or KTO examples (or their mismatched sequences), with the
        reference log-probs of those indices once they exist (0 for padding, index -1)."""
        items = self.splits[split]
        batch = (kto_batch(items, indices, self.pad_id, mismatched) if self.cfg.objective == "kto"
                 else pair_batch(items, indices, self.cfg.nll_on_prompt, self.pad_id))
        for side in self.sides if self.reference else ():
            batch[f"ref_{side}"] = torch.where(torch.tensor(indices) >= 0,
                                               self.reference[f"{split}/{side}"][[max(i, 0) for i in indices]], 0.0)
        return batch_to(batch, self.device)

    def batches(self, split: str, indices_per_micro) -> tuple[list[dict], float, float]:
        """The micro-batches of a step (or a validation slice) and the step's global chosen-token and pair (KTO:
        example) counts."""
        out = [self.batch(split, idx) for idx in indices_per_micro]
        real = "example_mask" if self.cfg.objective == "kto" else "pair_mask"
        n_tokens, n_items = all_reduce_sum([sum((split_pairs(b["labels"])[0] != IGNORE_INDEX).sum().item()
                                                for b in out if self.cfg.objective != "kto"),
                                            sum(b[real].sum().item() for b in out)], self.device)
        return out, n_tokens, n_items

    @torch.no_grad()
    def reference_point(self, engine, split: str, indices_per_micro) -> float | None:
        """KTO's z0 over the examples of all these micro-batches on all ranks (no gradient); None otherwise."""
        if self.cfg.objective != "kto":
            return None
        total, count = 0.0, 0.0
        for idx in indices_per_micro:
            batch = self.batch(split, idx, mismatched=True)
            real = batch["example_mask"]
            total += float((sequence_sums(engine, batch) - batch["ref_kl"])[real].sum())
            count += float(real.sum())
        return kto_reference_point(*all_reduce_sum([total, count], self.device))

    def reference_sizes(self) -> dict[str, int]:
        """The reference tensors a run keeps and their lengths ("train/chosen" -> training pairs, ...)."""
        return {f"{split}/{side}": len(items) for split, items in self.splits.items() for side in self.sides if items}

    @torch.no_grad()
    def reference_logprobs(self, engine) -> dict[str, torch.Tensor]:
        """log pi_ref of every example of every split under the model as it is now (the initial one), ranks
        sharing: {"train/chosen": [n_train], ...}. Computed without reference columns (`reference` is not set)."""
        engine.eval()
        out = {}
        for split, items in self.splits.items():
            if not items:
                continue

            def score(indices, split=split):
                batch = self.batch(split, indices)
                if self.cfg.objective == "kto":
                    kl_batch = self.batch(split, indices, mismatched=True)
                    return {"completion": sequence_sums(engine, batch), "kl": sequence_sums(engine, kl_batch)}
                return dict(zip(self.sides, split_pairs(sequence_sums(engine, batch))))
            logps = score_everything(score, len(items), self.cfg.micro_batch_size, self.rank, self.world_size,
                                     self.device)
            out |= {f"{split}/{side}": values for side, values in logps.items()}
        end_validation(engine)
        return out

    def loss_and_sums(self, engine, batch, n_tokens: float, n_items: float, kl: float | None
                      ) -> tuple[torch.Tensor, dict]:
        """One micro-batch forward: the loss to backpropagate and the sums the metrics are made of. n_tokens: the
        step's chosen tokens (ORPO's NLL), n_items: its pairs (KTO: examples), kl: KTO's reference point."""
        cfg = self.cfg
        if cfg.objective == "kto":
            return kto_loss(sequence_sums(engine, batch), batch["ref_completion"], batch["desirable"], kl, cfg.beta,
                            cfg.desirable_weight, cfg.undesirable_weight, n_examples=max(n_items, 1),
                            example_mask=batch["example_mask"])
        token_logps = -engine(**model_inputs(batch), reduction="none")  # forward: per-token log-probs [2B, T]
        parts = pair_logprobs(token_logps, batch["labels"], batch["response_mask"])
        real = batch["pair_mask"]
        if cfg.objective == "dpo":
            return dpo_loss(parts["chosen_sum_logps"], parts["rejected_sum_logps"], batch["ref_chosen"],
                            batch["ref_rejected"], cfg.beta, cfg.label_smoothing, n_pairs=max(n_items, 1),
                            pair_mask=real)
        if cfg.objective == "ipo":
            return ipo_loss(parts["chosen_sum_logps"], parts["rejected_sum_logps"], batch["ref_chosen"],
                            batch["ref_rejected"], parts["chosen_lengths"], parts["rejected_lengths"], cfg.beta,
                            n_pairs=max(n_items, 1), pair_mask=real)
        loss, sums = orpo_loss(parts["chosen_nll_sum"] / max(n_tokens, 1), parts["chosen_logps"],
                               parts["rejected_logps"], cfg.orpo_lambda, n_pairs=max(n_items, 1), pair_mask=real,
                               chosen_lengths=parts["chosen_lengths"], rejected_lengths=parts["rejected_lengths"])
        sums.update(nll_sum=parts["chosen_nll_sum"].item(), nll_tokens=float(parts["chosen_nll_tokens"]))
        return loss, sums

    def means(self, totals: dict, kl: float | None) -> dict:
        """The logged metrics from the sums of a step or a validation pass."""
        if self.cfg.objective == "orpo":
            return orpo_means(totals, self.cfg.orpo_lambda)
        return reference_means(totals) | ({"kl": kl} if kl is not None else {})

    @torch.no_grad()
    def validate(self, engine) -> dict:
        """Every held-out pair scored once on any number of ranks and micro-batch size; exact means ("val_*")."""
        engine.eval()
        micros = every_item_once(len(self.splits["valid"]), self.cfg.micro_batch_size, self.rank, self.world_size)
        kl = self.reference_point(engine, "valid", micros)  # KTO: over the whole set
        totals: dict[str, float] = {}
        for micro_indices in micros:
            micro, n_tokens, n_items = self.batches("valid", [micro_indices])
            for sums in (self.loss_and_sums(engine, b, n_tokens, n_items, kl)[1] for b in micro):
                totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        end_validation(engine)
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), self.device)))
        return {f"val_{k}": v for k, v in self.means(totals, kl).items()}
