"""Loss math against independent oracles: float64 re-derivations of every formula (per-token
log-probs, summed cross-entropy, per-sequence means, log(1 - e^x), ORPO's odds-ratio loss and each
metric, TRL's ORPO formula), naive full-logits gradients and torch.autograd.gradcheck for the chunked
log-probs, a two-rank gloo run for the metric all-reduce.

    cd /work/main && .venv/bin/python -m pytest -q tests/test_losses.py
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.losses import (cross_entropy_sum, global_mean_scale, log1mexp, odds_ratio_loss, orpo_loss, orpo_means,
                            pair_logprobs, sequence_logprobs, split_pairs, token_logprobs)
from minillm.sft_data import pair_batch

EPS = 1e-7  # odds_ratio_loss's clamp, part of the documented formula


def random_problem(n=37, d=16, v=50, ignore=0.3, dtype=torch.float32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore] = -100
    if shape is not None:
        hidden, labels = hidden.view(*shape, d), labels.view(*shape)
    return hidden, weight, labels


def naive_logprobs(hidden, weight, labels):
    """The textbook path: full [N, V] logits, log_softmax, gather; 0 at ignored positions."""
    logp = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, picked, 0.0)


def float64_logprob(h_row, weight, label):
    """log p(label) for one token from scratch in float64 Python math."""
    z = [sum(float(w) * float(h) for w, h in zip(weight[v], h_row)) for v in range(len(weight))]
    m = max(z)
    return z[label] - (m + math.log(sum(math.exp(x - m) for x in z)))


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("shape", [None, (3, 9)])
def test_token_logprobs_matches_float64(shape):
    n = 27
    hidden, weight, labels = random_problem(n=n, shape=shape)
    out = token_logprobs(hidden, weight, labels, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    h2, l2, o2 = hidden.reshape(n, -1).double(), labels.reshape(n), out.reshape(n)
    for i in range(n):
        want = 0.0 if l2[i] == -100 else float64_logprob(h2[i].tolist(), weight.double().tolist(), int(l2[i]))
        assert abs(float(o2[i]) - want) < 1e-5 * max(1.0, abs(want)), i
    assert (out[labels == -100] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 1024])  # 5 and 8 do not divide the 26 scored tokens
def test_chunked_gradients_equal_naive_full_logits(chunk_size):
    hidden, weight, labels = random_problem(n=37, seed=1)
    assert (labels != -100).sum() % 5 and (labels != -100).sum() % 8
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(2))  # arbitrary dL/dlogp

    def grads(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(h, w, labels)
        (out * upstream).sum().backward()
        return out.detach(), h.grad, w.grad

    out_c, gh_c, gw_c = grads(lambda h, w, y: token_logprobs(h, w, y, chunk_size=chunk_size))
    out_n, gh_n, gw_n = grads(naive_logprobs)
    torch.testing.assert_close(out_c, out_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh_c, gh_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_c, gw_n, rtol=1e-5, atol=1e-6)
    # Ignored positions: exactly zero gradient into their hidden rows.
    assert (gh_c[labels == -100] == 0).all() and (gh_c[labels != -100] != 0).any()


def test_gradcheck_float64():
    hidden, weight, labels = random_problem(n=11, d=4, v=7, dtype=torch.float64, seed=3)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, labels, chunk_size=3), (h, w))


def test_only_hidden_or_only_weight_needs_grad():
    hidden, weight, labels = random_problem(seed=4)
    h = hidden.clone().requires_grad_()
    token_logprobs(h, weight, labels, chunk_size=7).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    naive_logprobs(h_ref, weight, labels).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_()
    token_logprobs(hidden, w, labels, chunk_size=7).sum().backward()
    w_ref = weight.clone().requires_grad_()
    naive_logprobs(hidden, w_ref, labels).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zeros_and_zero_gradients():
    hidden, weight, _ = random_problem(n=6)
    labels = torch.full((6,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = token_logprobs(h, w, labels)
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()
    total, count = cross_entropy_sum(hidden, weight, labels)
    assert float(total) == 0.0 and int(count) == 0


def test_bf16_close_to_float64():
    hidden, weight, labels = random_problem(n=64, d=32, v=300, seed=5)
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    out = token_logprobs(hb, wb, labels, chunk_size=10)
    assert out.dtype == torch.float32
    upstream = torch.randn(64, generator=torch.Generator().manual_seed(6))
    (out * upstream).sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    # Oracle: the same (bf16-rounded) inputs in float64.
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    ref = naive_logprobs(h64, w64, labels).double()
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=0.15)  # bf16 logits: ulp 1/16 at 8-16
    for got, want in ((hb.grad, h64.grad), (wb.grad, w64.grad)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 2e-2, float(err)
    # and it agrees with the naive bf16 path (same bf16 logits) far more tightly
    torch.testing.assert_close(out, naive_logprobs(hb.detach(), wb.detach(), labels), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels = random_problem(n=5, v=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(hidden, weight, torch.tensor([0, 1, 10, -100, 2]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(hidden, weight, torch.tensor([0, 1, -1, -100, 2]))
    with pytest.raises(ValueError, match="does not match labels"):
        token_logprobs(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="bfloat16"):
        token_logprobs(hidden, weight.bfloat16(), labels)


# ----------------------------------------------------------------------------- cross_entropy_sum


def test_cross_entropy_sum_matches_float64_and_global_token_mean():
    # Two micro-batches of different lengths: sum / global count is the token-mean over both.
    parts = [random_problem(n=n, seed=s, shape=(1, n)) for n, s in ((9, 7), (23, 8))]
    weight = parts[0][1]
    sums, counts = zip(*(cross_entropy_sum(h, weight, y, chunk_size=4) for h, _, y in parts))
    for (h, _, y), s, c in zip(parts, sums, counts):
        ref = F.cross_entropy(F.linear(h.double(), weight.double()).flatten(0, 1), y.flatten(),
                              ignore_index=-100, reduction="sum")
        assert abs(float(s) - float(ref)) < 1e-4 and int(c) == int((y != -100).sum())
    all_h = torch.cat([h for h, _, _ in parts], 1).double()
    all_y = torch.cat([y for _, _, y in parts], 1)
    token_mean = F.cross_entropy(F.linear(all_h, weight.double()).flatten(0, 1), all_y.flatten())
    assert abs(float(sum(sums) / sum(counts)) - float(token_mean)) < 1e-5
    # ... which is NOT the mean of the two micro-batch means (the pattern the docstring warns about)
    assert abs(float(sum(s / c for s, c in zip(sums, counts)) / 2) - float(token_mean)) > 1e-3


@pytest.mark.parametrize("chunk_size", [3, 7, 1024])
def test_cross_entropy_sum_gradients_equal_naive(chunk_size):
    hidden, weight, labels = random_problem(n=37, seed=16, shape=(1, 37))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, count = cross_entropy_sum(h, w, labels, chunk_size=chunk_size)
    (total * 2.5).backward()  # an upstream scale != 1, as the global-token-mean scaling gives
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, w_ref)[0], labels[0], ignore_index=-100, reduction="sum")
    (ref * 2.5).backward()
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    assert (h.grad[labels == -100] == 0).all()
    # the same as summing token_logprobs (the recompute-in-backward path)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (-token_logprobs(h2, w2, labels, chunk_size=chunk_size).sum() * 2.5).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_sum_no_grad_bf16_and_single_backward():
    hidden, weight, labels = random_problem(n=64, d=32, v=300, seed=17)
    with torch.no_grad():
        total, _ = cross_entropy_sum(hidden.clone().requires_grad_(), weight, labels, chunk_size=10)
    assert not total.requires_grad
    ref = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels, reduction="sum")
    assert abs(float(total) - float(ref)) < 1e-3
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    total_b, _ = cross_entropy_sum(hb, wb, labels, chunk_size=10)
    total_b.backward(retain_graph=True)
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    ref_b = F.cross_entropy(F.linear(h64, w64), labels, reduction="sum")
    ref_b.backward()
    assert abs(float(total_b.detach()) - float(ref_b.detach())) < 0.5  # bf16 logits, 64 tokens
    for got, want in ((hb.grad, h64.grad), (wb.grad, w64.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 2e-2
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total_b.backward()


# ----------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_matches_float64_loop():
    g = torch.Generator().manual_seed(9)
    logps = -torch.rand(4, 7, generator=g) * 5
    mask = torch.rand(4, 7, generator=g) < 0.6
    mask[2] = False  # an empty sequence: mean 0, never NaN
    mask[3] = True
    total, count, mean = sequence_logprobs(logps, mask)
    for b in range(4):
        vals = [float(logps[b, t]) for t in range(7) if mask[b, t]]
        assert abs(float(total[b]) - sum(vals)) < 1e-5 and int(count[b]) == len(vals)
        assert abs(float(mean[b]) - (sum(vals) / len(vals) if vals else 0.0)) < 1e-6
    assert torch.isfinite(mean).all()


# ----------------------------------------------------------------------------- odds ratio / ORPO oracles


def f64_log1mexp(x):
    return math.log(-math.expm1(x))  # exact enough in float64 for every x used here


def f64_odds_ratio(a, b):
    """ORPO eq. 6-7 in float64 Python math, with the documented clamp a, b <= -eps."""
    a, b = min(a, -EPS), min(b, -EPS)
    log_odds = (a - b) - (f64_log1mexp(a) - f64_log1mexp(b))
    l_or = math.log1p(math.exp(-log_odds)) if log_odds > -30 else -log_odds  # -log sigmoid
    return l_or, log_odds


def trl_orpo_loss_f64(nll, a, b, beta):
    """TRL's ORPOTrainer.odds_ratio_loss + get_batch_loss_metrics, transcribed, in float64:
    log_odds = (a - b) - (log1p(-exp(a)) - log1p(-exp(b))); losses = beta * logsigmoid(log_odds);
    loss = nll - losses.mean()."""
    log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
    ratio = F.logsigmoid(log_odds)
    return nll - (beta * ratio).mean(), {"log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(),
                                         "rewards/accuracies": (beta * a > beta * b).double().mean(),
                                         "rewards/margins": (beta * a - beta * b).mean()}


def test_log1mexp_matches_float64_and_has_finite_gradients():
    xs = torch.tensor([-1e-7, -1e-4, -0.5, -math.log(2) + 1e-6, -math.log(2) - 1e-6, -0.7, -3.0, -20.0, -90.0])
    x = xs.clone().requires_grad_()
    y = log1mexp(x)
    y.sum().backward()
    for xi, yi in zip(xs.tolist(), y.tolist()):
        assert abs(yi - f64_log1mexp(xi)) <= 1e-6 * max(1.0, abs(f64_log1mexp(xi))), xi
    assert torch.isfinite(x.grad).all()
    for xi, gi in zip(xs.tolist(), x.grad.tolist()):  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
        want = -math.exp(xi) / -math.expm1(xi)
        assert abs(gi - want) <= 1e-4 * max(1.0, abs(want)), xi
    assert float(log1mexp(torch.tensor(0.0))) == -math.inf


def test_odds_ratio_loss_matches_float64_including_logps_near_zero():
    g = torch.Generator().manual_seed(10)
    a = -torch.rand(40, generator=g) * 4
    b = -torch.rand(40, generator=g) * 4
    a[:6] = torch.tensor([0.0, -1e-7, 0.0, -1e-7, -2.0, -1e-9])
    b[:6] = torch.tensor([-1.0, -1.0, 0.0, -1e-7, 0.0, -1e-7])
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    l_or, log_odds = odds_ratio_loss(a_, b_)
    assert l_or.dtype == torch.float32 and log_odds.dtype == torch.float32
    (l_or.sum() + log_odds.sum()).backward()
    for t in (l_or, log_odds, a_.grad, b_.grad):
        assert torch.isfinite(t).all()
    for i in range(40):
        want_l, want_lo = f64_odds_ratio(float(a[i]), float(b[i]))
        assert abs(float(l_or[i].detach()) - want_l) <= 1e-5 * max(1.0, abs(want_l)), i
        assert abs(float(log_odds[i].detach()) - want_lo) <= 1e-5 * max(1.0, abs(want_lo)), i


def test_odds_ratio_gradient_matches_float64_finite_differences():
    a = torch.tensor([-0.3, -1.5, -1e-3, -4.0], dtype=torch.float64)
    b = torch.tensor([-0.9, -0.2, -2.0, -1e-2], dtype=torch.float64)
    a_ = a.float().requires_grad_()
    odds_ratio_loss(a_, b.float())[0].sum().backward()
    for i in range(4):
        h = 1e-6
        ai, bi = float(a[i]), float(b[i])
        fd = (f64_odds_ratio(ai + h, bi)[0] - f64_odds_ratio(ai - h, bi)[0]) / (2 * h)
        assert abs(float(a_.grad[i]) - fd) < 1e-4 * max(1.0, abs(fd)), i


def test_orpo_loss_and_every_metric_match_float64_and_trl():
    g = torch.Generator().manual_seed(11)
    p, lam = 12, 0.1
    a = -torch.rand(p, generator=g) * 3 - 0.01
    b = -torch.rand(p, generator=g) * 3 - 0.01
    b[0] = a[0]  # a tie: counts as not accurate
    nll = torch.tensor(1.7)
    len_c, len_r = torch.randint(1, 30, (p,), generator=g), torch.randint(1, 30, (p,), generator=g)
    loss, sums = orpo_loss(nll, a, b, orpo_lambda=lam, chosen_lengths=len_c, rejected_lengths=len_r)
    m = orpo_means({**sums, "nll_sum": 1.7 * 40, "nll_tokens": 40.0}, lam)  # sums -> means, as the script does
    pairs = [f64_odds_ratio(float(x), float(y)) for x, y in zip(a, b)]
    want = {
        "nll": 1.7,
        "loss": 1.7 + lam * sum(l for l, _ in pairs) / p,
        "or_loss": sum(l for l, _ in pairs) / p,
        "log_odds": sum(lo for _, lo in pairs) / p,
        "chosen_logps": sum(a.double().tolist()) / p,
        "rejected_logps": sum(b.double().tolist()) / p,
        "reward_accuracy": sum(float(x > y) for x, y in zip(a.tolist(), b.tolist())) / p,
        "margin": sum(x - y for x, y in zip(a.double().tolist(), b.double().tolist())) / p,
        "chosen_length": sum(len_c.tolist()) / p, "rejected_length": sum(len_r.tolist()) / p,
        "pairs": p,
    }
    assert set(m) == set(want) and set(sums) == set(want) - {"nll", "loss"}
    for k, v in want.items():
        assert abs(float(m[k]) - v) <= 1e-5 * max(1.0, abs(v)), k
        assert k in ("nll", "loss") or isinstance(sums[k], float)  # plain numbers: nothing keeps the graph alive
    assert abs(float(loss) - (1.7 + lam * want["or_loss"])) < 1e-5
    # TRL's formula in float64 (no clamp needed away from 0): same loss and the mapped metrics.
    trl_loss, trl_m = trl_orpo_loss_f64(nll.double(), a.double(), b.double(), lam)
    assert abs(float(loss) - float(trl_loss)) < 1e-5
    assert abs(float(m["or_loss"]) + float(trl_m["log_odds_ratio"])) < 1e-5
    assert abs(float(m["log_odds"]) - float(trl_m["log_odds_chosen"])) < 1e-5
    assert abs(float(m["reward_accuracy"]) - float(trl_m["rewards/accuracies"])) < 1e-6
    assert abs(lam * float(m["margin"]) - float(trl_m["rewards/margins"])) < 1e-6


def test_orpo_loss_near_zero_logps_no_nan_and_n_pairs_normaliser():
    a = torch.tensor([0.0, -1e-7, -0.5], requires_grad=True)
    b = torch.tensor([0.0, 0.0, -1e-7], requires_grad=True)
    nll = torch.tensor(0.2, requires_grad=True)
    loss, m = orpo_loss(nll, a, b, orpo_lambda=0.25, n_pairs=6.0)
    loss.backward()
    assert all(torch.isfinite(t).all() for t in (loss, a.grad, b.grad)) and all(map(math.isfinite, m.values()))
    want = 0.2 + 0.25 * sum(f64_odds_ratio(float(x), float(y))[0] for x, y in zip(a.tolist(), b.tolist())) / 6.0
    assert abs(float(loss.detach()) - want) < 1e-5 * max(1.0, want)


def test_orpo_loss_rejects_empty_responses_and_bad_shapes():
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    with pytest.raises(ValueError, match=r"empty rejected response in pair\(s\) \[1\]"):
        orpo_loss(torch.tensor(1.0), a, b, rejected_lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="must both be"):
        orpo_loss(torch.tensor(1.0), a, b[:1])
    with pytest.raises(ValueError, match="no pairs"):
        orpo_loss(torch.tensor(1.0), a[:0], b[:0])
    # a padding pair (pair_mask False) may be empty: it adds nothing to the loss or the sums
    loss, sums = orpo_loss(torch.tensor(1.0), a, b, rejected_lengths=torch.tensor([3, 0]),
                           pair_mask=torch.tensor([True, False]), n_pairs=1.0)
    only, only_sums = orpo_loss(torch.tensor(1.0), a[:1], b[:1], rejected_lengths=torch.tensor([3]))
    torch.testing.assert_close(loss, only)
    assert sums == only_sums and sums["pairs"] == 1.0


# ----------------------------------------------------------------------------- one concatenated pass


def make_pairs(seed=12):
    """Two pairs with prompts and responses of different lengths: the chosen and rejected halves built by
    hand (ids, next-token labels with the prompt scored too, response mask), and the same pairs as
    minillm.sft_data pairs (aligned labels) for pair_batch."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 30, (n,), generator=g).tolist() for n in (3, 5)]

    def seqs(resp_lens):
        t = max(len(p) + r for p, r in zip(prompts, resp_lens))
        ids = torch.zeros(len(prompts), t, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        aligned = []
        for i, (prompt, r) in enumerate(zip(prompts, resp_lens)):
            p = len(prompt)
            row = prompt + torch.randint(3, 30, (r - 1,), generator=g).tolist() + [2]  # the reply ends with EOS 2
            ids[i, :p + r] = torch.tensor(row)
            labels[i, :p + r - 1] = ids[i, 1:p + r]  # shifted; the prompt is scored too (nll_on_prompt)
            resp[i, p - 1:p + r - 1] = True  # positions whose target is a response token (or EOS)
            aligned.append((row, [-100] * p + row[p:]))
        return {"input_ids": ids, "labels": labels, "response_mask": resp}, aligned

    chosen, c = seqs([4, 2])
    rejected, r = seqs([7, 1])
    pairs = [(*c[i], *r[i]) for i in range(2)]
    return chosen, rejected, pairs


class StandIn(nn.Module):
    """A tiny causal stand-in for the Llama: position t sees the running mean of embeddings <= t."""

    def __init__(self, vocab=30, dim=8):
        super().__init__()
        torch.manual_seed(13)
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def hidden_states(self, ids):
        e = self.emb(ids)
        running = e.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return torch.tanh(self.mix(running))


def orpo_from_logps(token_logps, labels, resp):
    stats = pair_logprobs(token_logps, labels, resp)
    nll = stats["chosen_nll_sum"] / stats["chosen_nll_tokens"]
    return orpo_loss(nll, stats["chosen_logps"], stats["rejected_logps"], orpo_lambda=0.1,
                     chosen_lengths=stats["chosen_lengths"], rejected_lengths=stats["rejected_lengths"])


def test_one_concatenated_pass_equals_two_separate_passes():
    chosen, rejected, pairs = make_pairs()
    model = StandIn()
    batch = pair_batch(pairs, [0, 1], nll_on_prompt=True, pad_id=0)
    assert batch["input_ids"].shape == (4, 10)  # chosen [2, 7] right-padded to rejected's [2, 10]
    for key in ("input_ids", "labels", "response_mask"):  # exactly the hand-built halves, right-padded
        assert torch.equal(batch[key][:2, :7], chosen[key]) and torch.equal(batch[key][2:], rejected[key])
    assert (batch["labels"][:2, 7:] == -100).all() and not batch["response_mask"][:2, 7:].any()
    logps = token_logprobs(model.hidden_states(batch["input_ids"]), model.output.weight, batch["labels"],
                           chunk_size=3)
    loss, metrics = orpo_from_logps(logps, batch["labels"], batch["response_mask"])
    loss.backward()
    grads_one = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    halves = [token_logprobs(model.hidden_states(x["input_ids"]), model.output.weight, x["labels"])
              for x in (chosen, rejected)]
    a_stats = [sequence_logprobs(lp, x["response_mask"]) for lp, x in zip(halves, (chosen, rejected))]
    scored = chosen["labels"] != -100
    nll = -halves[0][scored].sum() / scored.sum()
    loss2, metrics2 = orpo_loss(nll, a_stats[0][2], a_stats[1][2], orpo_lambda=0.1,
                                chosen_lengths=a_stats[0][1], rejected_lengths=a_stats[1][1])
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-6)
    for k in metrics:
        torch.testing.assert_close(metrics[k], metrics2[k], rtol=1e-6, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads_one[k], p.grad, rtol=1e-5, atol=1e-7)
    assert metrics["chosen_length"] == 4 + 2 and metrics["rejected_length"] == 7 + 1  # sums over the 2 pairs


def test_pair_logprobs_matches_float64_loop_and_empty_responses():
    _, _, pairs = make_pairs(seed=14)
    batch = pair_batch(pairs, [0, 1], nll_on_prompt=True, pad_id=0)
    logps = -torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(15)) * 3
    logps = torch.where(batch["labels"] != -100, logps, 0.0)
    stats = pair_logprobs(logps, batch["labels"], batch["response_mask"])
    lp, resp, lab = logps.double().tolist(), batch["response_mask"].tolist(), batch["labels"].tolist()
    for i in range(2):
        for half, key in ((i, "chosen"), (i + 2, "rejected")):
            vals = [lp[half][t] for t in range(len(lp[half])) if resp[half][t]]
            assert int(stats[f"{key}_lengths"][i]) == len(vals)
            assert abs(float(stats[f"{key}_logps"][i]) - sum(vals) / len(vals)) < 1e-6
    nll_vals = [-lp[i][t] for i in range(2) for t in range(len(lp[i])) if lab[i][t] != -100]
    assert abs(float(stats["chosen_nll_sum"]) - sum(nll_vals)) < 1e-5
    assert int(stats["chosen_nll_tokens"]) == len(nll_vals)

    resp = batch["response_mask"].clone()
    resp[3] = False  # second pair's rejected response is empty: length 0, mean 0 (not NaN) ...
    stats = pair_logprobs(logps, batch["labels"], resp)
    assert int(stats["rejected_lengths"][1]) == 0 and float(stats["rejected_logps"][1]) == 0.0
    with pytest.raises(ValueError, match=r"empty rejected response in pair\(s\) \[1\]"):  # ... refused for a real pair
        orpo_loss(stats["chosen_nll_sum"], stats["chosen_logps"], stats["rejected_logps"],
                  chosen_lengths=stats["chosen_lengths"], rejected_lengths=stats["rejected_lengths"])
    with pytest.raises(ValueError, match="not chosen \\+ rejected"):
        split_pairs(logps[:3])


# ----------------------------------------------------------------------------- metrics across ranks


def test_orpo_means_are_exact_means_of_the_sums():
    """Two micro-batches of 2 and 6 pairs: summing orpo_loss's sums and dividing once gives the per-pair
    means over all 8 pairs (not a mean of the two micro-batch means), and nll per token."""
    g = torch.Generator().manual_seed(21)
    a, b = -torch.rand(8, generator=g) * 2 - 0.01, -torch.rand(8, generator=g) * 2 - 0.01
    parts = [orpo_loss(torch.tensor(0.0), a[s], b[s])[1] for s in (slice(0, 2), slice(2, 8))]
    totals = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    totals.update(nll_sum=30.0, nll_tokens=12.0)
    means = orpo_means(totals, orpo_lambda=0.5)
    whole = [f64_odds_ratio(float(x), float(y)) for x, y in zip(a, b)]
    assert means["or_loss"] == pytest.approx(sum(l for l, _ in whole) / 8, rel=1e-6)
    assert means["margin"] == pytest.approx(float((a.double() - b.double()).mean()), rel=1e-6)
    assert means["nll"] == 2.5 and means["loss"] == pytest.approx(2.5 + 0.5 * means["or_loss"])
    assert means["pairs"] == 8.0


def test_global_mean_scale_undoes_deepspeeds_averaging():
    # 3 ranks x 2 micro-batches, 60 target tokens in the global batch: each micro-batch's summed NLL times
    # the scale, averaged over the 6 backward passes as DeepSpeed does, is sum(NLL) / 60.
    assert global_mean_scale(60, world_size=3, grad_accum=2) == pytest.approx(6 / 60)
    assert global_mean_scale(0, 1, 1) == 1.0  # no target at all: no division by zero


RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch.distributed as dist
    from minillm.engine import all_reduce_sum
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    print(json.dumps(all_reduce_sum([10.0 * (rank + 1), 2.0 + 3 * rank], "cpu")))
    dist.destroy_process_group()
""")


def test_all_reduce_sum_across_two_gloo_ranks(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), str(tmp_path / "rendezvous")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    import json
    for out, _ in outs:
        assert json.loads(out.strip().splitlines()[-1]) == [30.0, 7.0]  # every rank gets the sums


# ----------------------------------------------------------------------------- DPO, IPO, KTO


def test_dpo_ipo_kto_match_float64_formulas():
    """Each loss and metric against its paper's formula in float64 Python math, with padding rows masked out;
    cDPO's label smoothing (not in TRL 1.16's sigmoid loss) as TRL <= 0.x wrote it."""
    from minillm.losses import dpo_loss, ipo_loss, kto_loss, kto_reference_point, reference_means

    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g) for _ in range(4))
    lc, lr = torch.randint(1, 9, (6,), generator=g), torch.randint(1, 9, (6,), generator=g)
    real = torch.tensor([True, True, False, True, True, True])
    idx = [i for i in range(6) if real[i]]
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    beta, eps = 0.2, 0.1
    h = {i: float(pc[i] - rc[i]) - float(pr[i] - rr[i]) for i in idx}
    loss, sums = dpo_loss(pc, pr, rc, rr, beta, eps, n_pairs=5.0, pair_mask=real)
    want = sum(-(1 - eps) * logsig(beta * h[i]) - eps * logsig(-beta * h[i]) for i in idx) / 5
    assert abs(float(loss) - want) < 1e-5
    m = reference_means(sums)
    assert abs(m["rewards/margins"] - sum(beta * h[i] for i in idx) / 5) < 1e-5
    assert m["rewards/accuracies"] == sum(h[i] > 0 for i in idx) / 5
    assert abs(m["logps/chosen"] - sum(float(pc[i]) for i in idx) / 5) < 1e-5
    loss, _ = ipo_loss(pc, pr, rc, rr, lc, lr, beta, pair_mask=real)
    gap = {i: float(pc[i] - rc[i]) / int(lc[i]) - float(pr[i] - rr[i]) / int(lr[i]) for i in idx}
    assert abs(float(loss) - sum((gap[i] - 1 / (2 * beta)) ** 2 for i in idx) / 5) < 1e-4
    # KTO: z0 clamped at 0; desirable and undesirable sides, weights, per-side means
    assert kto_reference_point(-3.0, 2.0) == 0.0 and kto_reference_point(3.0, 2.0) == 1.5
    good = torch.tensor([True, False, True, False, False, True])
    z0, wd, wu = 0.3, 1.5, 0.7
    loss, sums = kto_loss(pc, rc, good, z0, beta, wd, wu, n_examples=5.0, example_mask=real)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r = {i: float(pc[i] - rc[i]) for i in idx}
    want = sum(wd * (1 - sig(beta * (r[i] - z0))) if good[i] else wu * (1 - sig(beta * (z0 - r[i]))) for i in idx) / 5
    assert abs(float(loss) - want) < 1e-6
    m = reference_means(sums)
    chosen = [beta * r[i] for i in idx if good[i]]
    rejected = [beta * r[i] for i in idx if not good[i]]
    assert abs(m["rewards/chosen"] - sum(chosen) / len(chosen)) < 1e-5
    assert abs(m["rewards/margins"] - (sum(chosen) / len(chosen) - sum(rejected) / len(rejected))) < 1e-5
