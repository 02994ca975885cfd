"""The loss math of every stage, written out: per-token log-probs from hidden states (chunked, exact
gradients), the token-level cross-entropy sum used by pretraining and SFT, ORPO's odds-ratio loss, and the
reference-model objectives beside it: DPO (with cDPO's label smoothing), IPO and KTO.

Label convention (the whole package): `labels[..., t]` is the token to predict at position t (the data
code already shifted input_ids left) and -100 marks positions that are not scored. Nothing here shifts.

Why chunk: at 2K tokens and a 128K vocabulary the logits alone are 1 GB in float32, and autograd keeps
a few tensors of that size (logits, log-softmax, their gradient). `token_logprobs` computes the logits
a chunk of tokens at a time, keeps only two floats per token (the target logit's log-prob and the
log-sum-exp), and recomputes each chunk's softmax in backward -- the scheme of fused
linear-cross-entropy kernels such as Liger-Kernel's (Hsu et al. 2024, arXiv:2410.10989).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# Default chunk: as many tokens as keep one chunk's float32 logits near 2^25 elements (128 MB), in
# multiples of 64 rows: 1024 tokens at Llama-2's 32K vocabulary, 256 at Llama-3's 128K. A fixed token
# count would let the chunk grow with the vocabulary (1024 x 128K is 0.5 GB, held twice in backward).
CHUNK_LOGITS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    return max(64, CHUNK_LOGITS // vocab_size // 64 * 64)

# ----------------------------------------------------------------------------- per-token log-probs


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs, float64 for float64 ones (gradcheck and oracles use it)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden, weight, idx, stat):
    """Logits of the rows `idx`, [len(idx), V] in `stat` dtype. The matmul runs in the input dtype
    (for bf16: fp32 accumulation inside cuBLAS/oneDNN, output rounded to bf16, exactly what
    model.output(hidden) gives); every softmax statistic after it is fp32."""
    return (hidden[idx] @ weight.t()).to(stat)


def _softmax_(logits):
    """Turn a chunk's logits into softmax probabilities IN PLACE and return their logsumexp.
    (torch.logsumexp / softmax would each allocate another chunk-sized buffer.)"""
    top = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
    logits.div_(total)
    return total.log_().add_(top).squeeze(1)


def _add_chunk_grads(grad_z, h, weight, idx, grad_hidden, grad_weight):
    """Given dL/dz for a chunk ([c, V], any float dtype): dL/dh = dL/dz @ W into grad_hidden's rows
    `idx`, and dL/dW += dL/dz^T h. In bf16 the weight gradient is summed over chunks in bf16, one
    rounding per chunk, as Liger does: an fp32 buffer would cost 4 more bytes per output weight."""
    grad_z = grad_z.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden[idx] = grad_z @ weight
    if grad_weight is not None:
        grad_weight.addmm_(grad_z.t(), h)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(label_n) = z_n[label_n] - logsumexp(z_n), z_n = W h_n, computed chunk by chunk.

    Only the rows whose label is not -100 are computed at all (SFT masks the prompt, so this also
    saves work). The forward keeps the logsumexp per token; the backward recomputes each chunk's
    softmax p_n from it and applies, for g_n = dL/d log p(label_n):
        dL/dz_n = g_n * (onehot(label_n) - p_n)
        dL/dh_n = dL/dz_n @ W                  (rows of ignored tokens: exactly 0)
        dL/dW   = sum_n dL/dz_n^T h_n          (accumulated over chunks)
    Cost: 4 [c, D] x [D, V] matmuls per chunk against the naive path's 3, for any upstream g.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden [N, D], weight [V, D], labels [N]
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        stat = _stat_dtype(hidden.dtype)
        logps = torch.zeros(labels.shape[0], dtype=stat, device=hidden.device)
        lse = torch.empty(rows.numel(), dtype=stat, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            logits = _chunk_logits(hidden, weight, idx, stat)
            target = logits.gather(1, labels[idx].unsqueeze(1)).squeeze(1)
            lse[start:start + chunk_size] = _softmax_(logits)
            logps[idx] = target - lse[start:start + chunk_size]
            del logits
        ctx.save_for_backward(hidden, weight, labels, rows, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps):
        hidden, weight, labels, rows, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_logps = grad_logps.to(lse.dtype)
        for start in range(0, rows.numel(), ctx.chunk_size):
            idx = rows[start:start + ctx.chunk_size]
            # p = exp(z - logsumexp(z)), recomputed in place, then g * (onehot - p)
            grad_z = _chunk_logits(hidden, weight, idx, lse.dtype)
            grad_z.sub_(lse[start:start + ctx.chunk_size].unsqueeze(1)).exp_()
            grad_z[torch.arange(idx.numel(), device=idx.device), labels[idx]] -= 1.0
            grad_z.mul_(-grad_logps[idx].unsqueeze(1))
            _add_chunk_grads(grad_z, hidden[idx], weight, idx, grad_hidden, grad_weight)
            del grad_z
        return grad_hidden, grad_weight, None, None


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """sum_n -log p(label_n), with the gradients computed DURING the forward pass.

    A scalar loss has a scalar upstream gradient, so dL/dz_n = p_n - onehot(label_n) is known
    before backward (scaled by that scalar later): the softmax is used right where it is computed
    and never recomputed, i.e. 3 matmuls per chunk like the naive path (Liger's
    LigerFusedLinearCrossEntropyFunction does the same). grad_hidden [N, D] and grad_weight [V, D]
    are held from forward to backward; with_grads=False (no grad mode, e.g. validation) skips them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, with_grads):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        stat = _stat_dtype(hidden.dtype)
        total = torch.zeros((), dtype=stat, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if with_grads and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if with_grads and ctx.needs_input_grad[1] else None
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            logits = _chunk_logits(hidden, weight, idx, stat)
            target = logits.gather(1, labels[idx].unsqueeze(1)).squeeze(1)
            total += (_softmax_(logits) - target).sum()
            if grad_hidden is not None or grad_weight is not None:
                logits[torch.arange(idx.numel(), device=idx.device), labels[idx]] -= 1.0  # p - onehot
                _add_chunk_grads(logits, hidden[idx], weight, idx, grad_hidden, grad_weight)
            del logits
        ctx.grads = (grad_hidden, grad_weight)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("cross_entropy_sum: backward ran twice through the same graph; its "
                               "gradients are computed in forward and handed out once")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        scale = grad_total.item()  # a Python float, so bf16 grads are scaled with fp32 precision
        if scale != 1.0:  # in place: no second [V, D] buffer
            for g in (grad_hidden, grad_weight):
                if g is not None:
                    g.mul_(scale)
        return grad_hidden, grad_weight, None, None, None


def _check_inputs(name, hidden, weight, labels, chunk_size):
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} does not match labels "
                         f"{tuple(labels.shape)} (want hidden [..., D] and labels [...])")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} is not [vocab, "
                         f"{hidden.shape[-1]}]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    vocab = weight.shape[0]
    # An out-of-range label would be a silent wrong gather on CPU and a device assert on GPU.
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"{name}: label {int(labels[bad][0])} is outside the vocabulary "
                         f"[0, {vocab}) and is not the ignore index {IGNORE_INDEX}")


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Log-probability of each label under the model: log softmax(hidden @ weight^T)[label].

    hidden [..., D] are the final normed hidden states (`model.hidden_states(...)`), weight [V, D] the
    output matrix (`model.output.weight`), labels [...] long, already shifted, -100 = ignored.
    Returns float32 [...] (float64 for float64 inputs) with 0 at ignored positions, whose hidden rows
    get exactly zero gradient.

    At most `chunk_size` tokens' logits exist at a time (default `default_chunk_size`: ~128 MB); the
    gradients are those of the naive `F.log_softmax(F.linear(hidden, weight).float(), -1).gather(label)`
    up to summation order. fp32, bf16 or fp16 inputs (hidden and weight alike): the matmul runs in that
    dtype as model.output(hidden) would, every softmax statistic in fp32; in bf16 the weight gradient is
    summed over chunks in bf16 (one rounding per chunk, as Liger does).
    """
    _check_inputs("token_logprobs", hidden, weight, labels, chunk_size)
    flat = _ChunkedTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                       chunk_size or default_chunk_size(weight.shape[0]))
    return flat.view(labels.shape)


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token negative log-likelihood, sum_t -log p(label_t), and the number of scored tokens.

    Chunked like `token_logprobs`, but faster when only the sum is needed (pretraining, SFT): the loss is
    a scalar, so its gradients are computed in the forward pass and no softmax is recomputed (3 matmuls
    per chunk, as the naive path, against token_logprobs' 4); backward may therefore run once per graph.
    Under torch.no_grad() only the loss is computed.

    Returns (loss_sum float32 scalar, n_tokens int64 scalar): a sum, because a step's loss is the sum over
    every target token of the global batch divided by their count (see `global_mean_scale`).
    """
    _check_inputs("cross_entropy_sum", hidden, weight, labels, chunk_size)
    total = _ChunkedCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                          chunk_size or default_chunk_size(weight.shape[0]),
                                          torch.is_grad_enabled())
    return total, (labels != IGNORE_INDEX).sum()


def global_mean_scale(n_tokens_global: float, world_size: int, grad_accum: int) -> float:
    """Factor turning a micro-batch's summed NLL into its share of the step's global token-mean loss.

    DeepSpeed divides each backward by grad_accum and averages gradients over ranks; multiplying by
    world_size * grad_accum undoes both, so the step's gradient is that of sum(NLL) / n_tokens over the
    whole global batch: every token weighs the same however tokens fall into sequences, micro-batches and
    ranks (a mean of per-sequence or per-micro-batch means would over-weight short ones)."""
    return world_size * grad_accum / max(n_tokens_global, 1.0)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence (sum, count, mean) of token log-probs over the positions where mask is true.

    token_logps [B, T] float, mask [B, T] bool -> three [B] tensors: sum_t m_t lp_t (float32),
    count = sum_t m_t (int64), mean = sum / count. A sequence with count 0 gets mean 0 (not NaN);
    ORPO refuses empty responses of real pairs (`orpo_loss`).
    """
    mask = mask.bool()
    total = torch.where(mask, token_logps.float(), 0.0).sum(-1)
    count = mask.sum(-1)
    return total, count, total / count.clamp_min(1)


# ----------------------------------------------------------------------------- ORPO


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurately (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))"):
    log1p(-e^x) for x < -ln 2, log(-expm1(x)) otherwise. x = 0 gives -inf.

    Each branch only ever sees inputs from its own domain, so the branch that torch.where discards
    cannot put a NaN into the gradient.
    """
    far = x < -math.log(2.0)
    return torch.where(far, torch.log1p(-torch.exp(torch.where(far, x, -1.0))),
                       torch.log(-torch.expm1(torch.where(far, -1.0, x))))


def odds_ratio_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, eps: float = 1e-7
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", arXiv:2403.07691, eq. 6-7).

    a = chosen_logps, b = rejected_logps [P]: the MEAN log-probability of each response's tokens
    (length-normalised, as in the paper and TRL), so P(y|x) = e^a and odds(y|x) = e^a / (1 - e^a):
        log_odds = log(odds_chosen / odds_rejected) = (a - b) - (log(1 - e^a) - log(1 - e^b))
        L_OR     = -log sigmoid(log_odds)
    Computed in float32 with a stable log(1 - e^x) (`log1mexp`). a and b are first clamped to at most
    -eps: a response the model is certain of (a = 0) would make log(1 - e^a) = -inf; at the clamp it
    is log(eps) instead, and a or b above -eps passes no gradient. Returns (L_OR [P], log_odds [P]).
    """
    a = chosen_logps.float().clamp(max=-eps)
    b = rejected_logps.float().clamp(max=-eps)
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    return -F.logsigmoid(log_odds), log_odds


def orpo_loss(chosen_nll: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              orpo_lambda: float = 0.1, *, n_pairs: float | None = None, pair_mask: torch.Tensor | None = None,
              chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
              eps: float = 1e-7) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO objective (Hong et al. 2024, arXiv:2403.07691, eq. 6):  L = NLL(chosen) + lambda * mean L_OR.

    chosen_nll: the NLL term, already normalised by the caller (the summed chosen-token NLL over the global
      token count); which tokens it covers (response only, or prompt too as TRL) the caller's labels decide.
    chosen_logps, rejected_logps [P]: mean response-token log-probs a, b (`pair_logprobs`).
    orpo_lambda: weight of the odds-ratio term (the paper's lambda, --orpo-lambda; TRL calls it beta,
      default 0.1).
    n_pairs: what the summed L_OR is divided by; default the number of real pairs here. Pass the global
      pair count of the step (and the caller scales like the NLL) so every pair weighs the same.
    pair_mask [P] bool: False for padding pairs (they add nothing; every rank needs the same number of rows).
    chosen_lengths, rejected_lengths [P]: response token counts; an empty response of a real pair raises
      ValueError (its mean log-prob would be 0/0), and the lengths are summed into the metrics.
    eps: the clamp of `odds_ratio_loss`: near a = b = 0 the gradient is ~ lambda / (P |a|), large but finite
      (TRL's unclamped formula gives -inf / NaN there); gradient clipping bounds it.

    Returns (loss, sums): SUMS over the real pairs, so that means over micro-batches and ranks are exact
    (sum everything, divide once by the total "pairs"; `orpo_means` does):
      pairs            number of real pairs
      or_loss          sum of L_OR = -log sigmoid(log_odds)             (TRL: -log_odds_ratio)
      log_odds         sum of log_odds                                  (TRL: log_odds_chosen)
      chosen_logps     sum of a; rejected_logps: sum of b               (TRL: logps/chosen, /rejected)
      reward_accuracy  number of pairs with a > b (ties count as wrong) (TRL: rewards/accuracies)
      margin           sum of (a - b), nats per token                   (TRL's rewards/margins is lambda * this)
      chosen_length, rejected_length  summed response tokens (when lengths are given)
    """
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(f"orpo_loss: chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} must both be [pairs]")
    real = torch.ones_like(chosen_logps, dtype=torch.bool) if pair_mask is None else pair_mask.bool()
    for name, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        if lengths is not None and ((lengths == 0) & real).any():
            empty = ((lengths == 0) & real).nonzero().flatten().tolist()
            raise ValueError(f"orpo_loss: empty {name} response in pair(s) {empty}; drop such pairs in the data code")
    pairs = int(real.sum())
    if pairs == 0 and n_pairs is None:
        raise ValueError("orpo_loss: no pairs (every pair of the batch was dropped?)")
    l_or, log_odds = odds_ratio_loss(chosen_logps, rejected_logps, eps)
    l_or = torch.where(real, l_or, 0.0)
    loss = chosen_nll + orpo_lambda * l_or.sum() / (pairs if n_pairs is None else n_pairs)
    with torch.no_grad():
        a, b = chosen_logps.float()[real], rejected_logps.float()[real]
        sums = {"pairs": float(pairs), "or_loss": float(l_or.sum()), "log_odds": float(log_odds[real].sum()),
                "chosen_logps": float(a.sum()), "rejected_logps": float(b.sum()),
                "reward_accuracy": float((a > b).sum()), "margin": float((a - b).sum())}
        if chosen_lengths is not None:
            sums["chosen_length"] = float(chosen_lengths[real].sum())
        if rejected_lengths is not None:
            sums["rejected_length"] = float(rejected_lengths[real].sum())
    return loss, sums


def orpo_means(totals: dict[str, float], orpo_lambda: float) -> dict[str, float]:
    """Metrics from sums over a whole step or validation set (`orpo_loss`'s, plus "nll_sum" and "nll_tokens"
    of the chosen tokens scored by the NLL): per-pair quantities divided by the pair count, nll by the
    token count, and loss = nll + orpo_lambda * or_loss, exactly as the training objective."""
    pairs = max(totals["pairs"], 1.0)
    out = {k: v / pairs for k, v in totals.items() if k not in ("pairs", "nll_sum", "nll_tokens")}
    out["nll"] = totals["nll_sum"] / max(totals["nll_tokens"], 1.0)
    out["loss"] = out["nll"] + orpo_lambda * out["or_loss"]
    out["pairs"] = totals["pairs"]
    return out


# ----------------------------------------------------------------------------- DPO, IPO, KTO (a reference model)
# These compare the policy with the initial model pi_ref through log-ratios r(y|x) = log pi(y|x) - log pi_ref(y|x),
# where log pi(y|x) is the SUMMED log-prob of the response tokens (`sequence_logprobs`' sum, as TRL). log pi_ref
# is computed once before training (minillm.preference) and read from the run directory, so no second model is
# in memory. Like `orpo_loss`, each returns (loss, sums): sums over the real examples, divided once per step or
# validation set by `reference_means`, so means do not depend on how examples fall into micro-batches and ranks.


def _pair_sums(per_pair, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, real) -> dict[str, float]:
    """The sums behind TRL's DPOTrainer metrics (rewards/*, logps/*) over the real pairs."""
    with torch.no_grad():
        c, r = chosen_rewards[real].float(), rejected_rewards[real].float()
        return {"pairs": float(real.sum()), "loss": float(per_pair[real].sum()),
                "rewards/chosen": float(c.sum()), "rewards/rejected": float(r.sum()),
                "rewards/accuracies": float((c > r).sum()), "rewards/margins": float((c - r).sum()),
                "logps/chosen": float(chosen_logps[real].sum()), "logps/rejected": float(rejected_logps[real].sum())}


def _check_pairs(name, *logps):
    if any(x.shape != logps[0].shape for x in logps) or logps[0].dim() != 1:
        raise ValueError(f"{name}: the policy and reference log-probs must all be [pairs], got "
                         f"{[tuple(x.shape) for x in logps]}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0, *,
             n_pairs: float | None = None, pair_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7), with conservative
    label smoothing (cDPO, Mitchell 2023: each label is wrong with probability eps):
        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    chosen_logps, rejected_logps [P]: summed response-token log-probs of the policy; ref_*: of pi_ref.
    beta: strength of the KL tie to pi_ref (TRL's default 0.1). n_pairs: the divisor of the summed loss (the
    step's global pair count; default the real pairs here). pair_mask [P]: False for padding pairs.
    The implicit rewards are beta * log-ratio (TRL: rewards/chosen, rewards/rejected; accuracies: chosen > rejected).
    """
    _check_pairs("dpo_loss", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    real = torch.ones_like(chosen_logps, dtype=torch.bool) if pair_mask is None else pair_mask.bool()
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    per_pair = torch.where(real, per_pair, 0.0)
    loss = per_pair.sum() / (max(float(real.sum()), 1.0) if n_pairs is None else n_pairs)
    return loss, _pair_sums(per_pair, chosen_logps, rejected_logps, beta * chosen_ratio, beta * rejected_ratio, real)


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
             beta: float = 0.1, *, n_pairs: float | None = None, pair_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, eq. 17): a squared loss that pulls the log-ratio gap to 1 / (2 beta) instead of to infinity,
    on log-ratios averaged per response token (TRL's normalisation, confirmed by the IPO authors):
        h = [log pi(y_w|x) - log pi_ref(y_w|x)] / |y_w| - [log pi(y_l|x) - log pi_ref(y_l|x)] / |y_l|
        L = (h - 1 / (2 beta))^2
    Arguments as `dpo_loss`, plus the response token counts [P]. Rewards stay beta * (summed) log-ratio, as TRL.
    """
    _check_pairs("ipo_loss", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    real = torch.ones_like(chosen_logps, dtype=torch.bool) if pair_mask is None else pair_mask.bool()
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio / chosen_lengths.clamp_min(1) - rejected_ratio / rejected_lengths.clamp_min(1)
    per_pair = torch.where(real, (h - 1 / (2 * beta)) ** 2, 0.0)
    loss = per_pair.sum() / (max(float(real.sum()), 1.0) if n_pairs is None else n_pairs)
    return loss, _pair_sums(per_pair, chosen_logps, rejected_logps, beta * chosen_ratio, beta * rejected_ratio, real)


def kto_reference_point(kl_logratio_sum: float, count: float) -> float:
    """KTO's reference point z0 (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) as TRL estimates it:
        z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])
    over the batch's mismatched pairs (x_i, y'_i) (y'_i: another example's completion), a number without
    gradient. Here the mean runs over the whole step's (or validation set's) examples on all ranks."""
    return max(kl_logratio_sum / max(count, 1.0), 0.0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: float, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, *, n_examples: float | None = None,
             example_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306,
    eq. 7-8) on unpaired examples, each desirable or undesirable:
        r = log pi(y|x) - log pi_ref(y|x)        (summed completion-token log-probs)
        L = w_D (1 - sigmoid(beta (r - z0)))     for a desirable y
        L = w_U (1 - sigmoid(beta (z0 - r)))     for an undesirable y
    z0 = kl: `kto_reference_point`. logps, ref_logps [N]; desirable [N] bool; n_examples: the divisor of the summed
    loss (the step's global example count); example_mask [N]: False for padding. TRL's metrics: rewards/chosen
    (mean beta r over desirable), rewards/rejected (over undesirable), logps/chosen, logps/rejected; the sums here
    also count "desirable" and "undesirable" (their divisors)."""
    if not (logps.shape == ref_logps.shape == desirable.shape) or logps.dim() != 1:
        raise ValueError(f"kto_loss: logps {tuple(logps.shape)}, ref_logps {tuple(ref_logps.shape)} and desirable "
                         f"{tuple(desirable.shape)} must all be [examples]")
    real = torch.ones_like(logps, dtype=torch.bool) if example_mask is None else example_mask.bool()
    good, bad = real & desirable.bool(), real & ~desirable.bool()
    ratio = logps.float() - ref_logps.float()
    per_example = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                              undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    per_example = torch.where(real, per_example, 0.0)
    loss = per_example.sum() / (max(float(real.sum()), 1.0) if n_examples is None else n_examples)
    with torch.no_grad():
        rewards = beta * ratio
        sums = {"examples": float(real.sum()), "desirable": float(good.sum()), "undesirable": float(bad.sum()),
                "loss": float(per_example.sum()), "rewards/chosen": float(rewards[good].sum()),
                "rewards/rejected": float(rewards[bad].sum()), "logps/chosen": float(logps[good].float().sum()),
                "logps/rejected": float(logps[bad].float().sum())}
    return loss, sums


def reference_means(totals: dict[str, float]) -> dict[str, float]:
    """Metrics of `dpo_loss`/`ipo_loss`/`kto_loss` from sums over a whole step or validation set: per-pair
    quantities divided by the pairs (KTO: the loss by the examples, rewards/chosen and logps/chosen by the
    desirable examples, */rejected by the undesirable ones, rewards/margins = rewards/chosen - rewards/rejected,
    as TRL's KTOTrainer). Other keys (a "kl", lengths) pass through as given or per pair."""
    if "examples" in totals:  # KTO
        good, bad = max(totals["desirable"], 1.0), max(totals["undesirable"], 1.0)
        out = {k: v for k, v in totals.items()}
        out["loss"] = totals["loss"] / max(totals["examples"], 1.0)
        for side, n in (("chosen", good), ("rejected", bad)):
            out[f"rewards/{side}"], out[f"logps/{side}"] = totals[f"rewards/{side}"] / n, totals[f"logps/{side}"] / n
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
    pairs = max(totals["pairs"], 1.0)
    return {k: v if k == "pairs" else v / pairs for k, v in totals.items()}


# ----------------------------------------------------------------------------- one pass for both answers


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] -> (chosen [B, ...], rejected [B, ...]) for a batch built by `minillm.sft_data.pair_batch`."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs: batch of {x.shape[0]} rows is not chosen + rejected halves")
    half = x.shape[0] // 2
    return x[:half], x[half:]


def pair_logprobs(token_logps: torch.Tensor, labels: torch.Tensor,
                  response_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Everything ORPO needs from one concatenated pass: token_logps [2B, T] (per-token log-probs of a
    `pair_batch`, 0 where not scored), labels [2B, T], response_mask [2B, T] bool (the response + EOS
    tokens; default: labels != -100).

    Returns chosen_nll_sum (sum of -log p over the chosen half's labels, prompt included if the labels
    include it), chosen_nll_tokens (their count), chosen_logps / rejected_logps [B] (mean log-prob over
    the response tokens: a and b of `odds_ratio_loss`; 0 for a padding pair, which has none),
    chosen_sum_logps / rejected_sum_logps [B] (their sums: what DPO, IPO and KTO compare with pi_ref) and
    chosen_lengths / rejected_lengths [B] (response token counts)."""
    if response_mask is None:
        response_mask = labels != IGNORE_INDEX
    logps_c, logps_r = split_pairs(token_logps)
    mask_c, mask_r = split_pairs(response_mask)
    labels_c, _ = split_pairs(labels)
    sum_c, len_c, a = sequence_logprobs(logps_c, mask_c)
    sum_r, len_r, b = sequence_logprobs(logps_r, mask_r)
    scored_c = labels_c != IGNORE_INDEX
    return {"chosen_nll_sum": -torch.where(scored_c, logps_c.float(), 0.0).sum(),
            "chosen_nll_tokens": scored_c.sum(),
            "chosen_logps": a, "rejected_logps": b, "chosen_sum_logps": sum_c, "rejected_sum_logps": sum_r,
            "chosen_lengths": len_c, "rejected_lengths": len_r}
